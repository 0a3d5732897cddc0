"""Models as compositions of registered parts: backbone (+ refiner) (+ neck) -> head.

A composition is a small spec naming one registered part per slot, each with its
constructor fields::

  {"backbone": ("mit_b0", {}),
   "refiner": ("frm", {...}),                  # optional, features -> features
   "neck": ("fpn", {"out_channels": 64}),      # optional, features -> features
   "head": ("fpn_head", {"channels": 64}),
   "projection": ("projection_head", {...}),   # optional, pixel embedding
   "projection_source": ("neck", 0),
   "classifier": "conv"}

Named presets (``ecenet_mit_b0``, ``frm_van_b0``, ``segformer_b0_ol`` ...) are
registered specs; ``config.model`` picks a preset by ``name`` and may replace any
part (``model.backbone=swin_b``, ``model.head=ecenet_head``) or the classifier
(``model.classifier=offset_learning``), and add fields to a part
(``model.backbone_args``, ``model.head_args``, ...). With ``model.name=''`` the
model is built from the parts alone.
"""

from __future__ import annotations

import copy
from typing import Any, Mapping

import jax.numpy as jnp

from offseg_jax.models.family import as_field as _as_field
from offseg_jax.models.segmentor import EncoderDecoder
from offseg_jax.registry import BACKBONES, BLOCKS, HEADS, MODELS, NECKS

# Slot -> the registry its part comes from.
SLOTS = {"backbone": BACKBONES, "refiner": NECKS, "neck": NECKS, "head": HEADS,
         "projection": BLOCKS}

COMPOSITIONS: dict[str, dict[str, Any]] = {}
# Presets whose MODELS entry is the composition itself (not a family builder).
COMPOSED_PRESETS: set[str] = set()


def register_composition(name: str, spec: Mapping[str, Any], *, doc: str = "",
                         from_official=None, torch_ignore=(), register_model: bool = True):
  """Registers ``spec`` as preset ``name`` (and as a ``MODELS`` entry by default).

  ``register_model=False`` records the spec of a preset whose ``MODELS`` entry is
  registered by its family module (SegFormer, SegNeXt, OffSeg), so that its parts
  can still be swapped from the config.
  """
  if name in COMPOSITIONS:
    raise ValueError(f"composition {name!r} is registered twice")
  for slot in spec:
    if slot not in SLOTS and slot not in ("classifier", "projection_source"):
      raise ValueError(f"composition {name!r} has unknown slot {slot!r}; slots: {sorted(SLOTS)}")
  COMPOSITIONS[name] = dict(spec)
  if register_model:
    COMPOSED_PRESETS.add(name)

    def build(num_classes: int, **overrides):
      return build_composed(num_classes, COMPOSITIONS[name], **overrides)
    build.__doc__ = doc or f"Composition {name}: " + ", ".join(
        f"{slot}={spec[slot][0]}" for slot in SLOTS if spec.get(slot))
    MODELS.register(name, from_official=from_official, torch_ignore=torch_ignore)(build)


def build_composed(num_classes: int, spec: Mapping[str, Any], *, dtype: Any = jnp.float32,
                   classifier: str | None = None) -> EncoderDecoder:
  """Builds an :class:`EncoderDecoder` from a composition ``spec``.

  ``dtype`` (compute dtype) goes to every part; ``classifier`` replaces the
  spec's classifier kind of the head.
  """
  if not spec.get("backbone") or not spec.get("head"):
    raise ValueError(f"a composed model needs a backbone and a head; got "
                     f"backbone={spec.get('backbone')!r}, head={spec.get('head')!r}")
  dtype = jnp.dtype(dtype)
  parts = {}
  for slot, registry in SLOTS.items():
    if not spec.get(slot):
      continue
    part_name, fields = spec[slot]
    fields = _as_field(dict(fields))
    if slot == "head":
      kind = classifier or spec.get("classifier")
      if kind:
        fields["classifier"] = kind
      parts[slot] = registry.build(part_name, num_classes, dtype=dtype, **fields)
    else:
      parts[slot] = registry.build(part_name, dtype=dtype, **fields)
  return EncoderDecoder(
      backbone=parts["backbone"], decode_head=parts["head"], neck=parts.get("neck"),
      refiner=parts.get("refiner"), projection=parts.get("projection"),
      projection_source=tuple(spec.get("projection_source", ("neck", 0))))


def resolve_spec(model_config: Mapping[str, Any]) -> dict[str, Any] | None:
  """The composition ``config.model`` describes, or None for a plain preset.

  Parts named in the config (``backbone``, ``refiner``, ``neck``, ``head``,
  ``projection``; '' keeps the preset's) replace the preset's part and its fields;
  ``<slot>_args`` add or replace fields of that slot's part.
  """
  cfg = dict(model_config)
  name = cfg.get("name", "")
  swaps = {slot: cfg.get(slot) for slot in SLOTS if cfg.get(slot)}
  extra = {slot: dict(cfg.get(f"{slot}_args") or {}) for slot in SLOTS
           if cfg.get(f"{slot}_args")}
  if name and name not in COMPOSITIONS:
    if swaps or extra:
      raise ValueError(
          f"model {name!r} is not a composition, so model.{sorted(swaps or extra)[0]} "
          f"cannot apply; compositions: {sorted(COMPOSITIONS)}")
    return None
  spec = copy.deepcopy(COMPOSITIONS[name]) if name else {}
  for slot, part in swaps.items():
    SLOTS[slot].get(part)                      # unknown names fail here, with suggestions
    spec[slot] = (part, {})
  for slot, fields in extra.items():
    if not spec.get(slot):
      raise ValueError(f"model.{slot}_args given but the model has no {slot}")
    part, base = spec[slot]
    spec[slot] = (part, {**dict(base), **fields})
  return spec
