"""What the model-family modules share: registration, override routing, config checks.

* :func:`as_field`: a config value as a module field (lists -> tuples, nested),
  so that flax modules stay hashable whatever the config parser produced;
* :func:`register_backbones`: a backbone class under a family name and under
  each of its preset sizes (``mit``, ``mit_b0`` ... ``mit_b5``), any field
  overridable and unknown fields refused by name;
* :func:`register_head`: a decode head class as a ``HEADS`` builder
  ``(num_classes, **fields)``;
* :func:`build_encoder_decoder` and :func:`register_models`: the
  ``<family>_<size>[_ol]`` models of an mmseg backbone + decode head family
  (SegFormer, SegNeXt), with overrides routed to the module that has them;
* :func:`backbone_from_official`, :func:`backbone_fields_from_official`,
  :func:`offset_learning_variant` and ``check_*``: the generic parts of an
  official mmseg config, refused the same way by every family.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

from offseg_jax.models.segmentor import EncoderDecoder
from offseg_jax.registry import BACKBONES, HEADS, MODELS


def as_field(value):
  """Config lists -> tuples (nested too, also inside mappings), so module fields stay hashable."""
  if isinstance(value, (list, tuple)):
    return tuple(as_field(v) for v in value)
  if isinstance(value, Mapping):
    return {k: as_field(v) for k, v in value.items()}
  return value


def module_fields(cls) -> set[str]:
  """The constructor fields of a flax module class (without ``parent``/``name``)."""
  return {f.name for f in dataclasses.fields(cls)} - {"parent", "name"}


def register_backbones(cls, presets: Mapping[str, Mapping[str, Any]], *,
                       doc: Callable[[str], str], family: str | None = None,
                       from_official=None, torch_ignore: Sequence[str] = ()) -> None:
  """Registers ``cls`` in ``BACKBONES`` under each preset name (and ``family``).

  Args:
    cls: the backbone module class.
    presets: registry name -> the fields of that size.
    doc: registry name -> the builder's one-line description.
    family: also register ``cls`` with its own defaults under this name.
    from_official, torch_ignore: as ``BACKBONES.register`` takes them, for
      every name.

  Every builder takes any field of ``cls`` as a keyword override; an unknown
  name raises a ``TypeError`` that lists the valid ones.
  """
  fields = module_fields(cls)

  def builder(preset: Mapping[str, Any], description: str):
    def build(**overrides):
      unknown = set(overrides) - fields
      if unknown:
        raise TypeError(f"Unknown {cls.__name__} fields {sorted(unknown)}; "
                        f"known: {sorted(fields)}")
      return cls(**{**preset, **as_field(overrides)})
    build.__doc__ = description
    return build

  register = lambda name: BACKBONES.register(name, from_official=from_official,
                                             torch_ignore=torch_ignore)
  if family is not None:
    register(family)(builder({}, f"{cls.__name__} with its constructor defaults, "
                                 "any field overridable."))
  for name, preset in presets.items():
    register(name)(builder(as_field(dict(preset)), doc(name)))


def register_head(name: str, cls, *, doc: str, from_official=None,
                  torch_ignore: Sequence[str] = ()) -> None:
  """Registers head class ``cls`` in ``HEADS`` as ``name``: ``(num_classes, **fields)``.

  ``fields`` override the class defaults (config lists become tuples); ``doc``
  is the builder's description.
  """
  def build(num_classes: int, **fields):
    return cls(num_classes=num_classes, **as_field(fields))
  build.__doc__ = doc
  HEADS.register(name, from_official=from_official, torch_ignore=torch_ignore)(build)


def build_encoder_decoder(backbone_cls, backbone_fields: Mapping[str, Any], head_cls,
                          head_fields: Mapping[str, Any],
                          overrides: Mapping[str, Any]) -> EncoderDecoder:
  """An ``EncoderDecoder`` with each override routed to the module that has it.

  ``dtype`` goes to both modules; any other name must be a field of exactly one
  of them, or a ``TypeError`` names the valid choices.
  """
  backbone_names, head_names = module_fields(backbone_cls), module_fields(head_cls)
  backbone_kw, head_kw = dict(backbone_fields), dict(head_fields)
  for key, value in overrides.items():
    value = as_field(value)
    if key == "dtype":
      backbone_kw[key] = head_kw[key] = value
    elif key in backbone_names and key in head_names:
      raise TypeError(f"Override {key!r} is ambiguous (backbone and head both have it)")
    elif key in backbone_names:
      backbone_kw[key] = value
    elif key in head_names and key != "num_classes":
      head_kw[key] = value
    else:
      valid = sorted((backbone_names | head_names) - {"num_classes"})
      raise TypeError(f"Unknown override {key!r}; valid: {valid}")
  return EncoderDecoder(backbone=backbone_cls(**backbone_kw),
                        decode_head=head_cls(**head_kw))


def register_models(family: str, sizes: Mapping[str, Mapping[str, Any]], *, backbone_cls,
                    head_cls, head_fields: Callable[[str, bool], Mapping[str, Any]],
                    doc: Callable[[str, bool], str], from_official,
                    torch_ignore: Sequence[str]) -> None:
  """Registers ``<family>_<size>`` and ``<family>_<size>_ol`` for every size.

  Args:
    family: name prefix, e.g. 'segformer'.
    sizes: size -> the backbone fields of that size.
    backbone_cls, head_cls: the module classes.
    head_fields: (size, offset_learning) -> the head fields of that model.
    doc: (size, offset_learning) -> the builder's description.
    from_official, torch_ignore: as ``MODELS.register`` takes them.

  Each builder is ``(num_classes, **overrides)``, overrides going to the module
  that has the field (:func:`build_encoder_decoder`).
  """
  for size, backbone_fields in sizes.items():
    for ol in (False, True):
      def build(num_classes: int, _b=backbone_fields, _h=dict(head_fields(size, ol)),
                **overrides):
        return build_encoder_decoder(backbone_cls, _b, head_cls,
                                     dict(_h, num_classes=num_classes), overrides)

      build.__doc__ = doc(size, ol)
      MODELS.register(f"{family}_{size}" + ("_ol" if ol else ""), from_official=from_official,
                      torch_ignore=torch_ignore)(build)


def backbone_from_official(cls, fields_from_official: Callable[[Mapping[str, Any]], dict]):
  """The ``from_official`` of backbone ``cls``, whose config mapping is ``fields_from_official``.

  The returned ``from_official(official_config, num_classes=None, **overrides)``
  builds ``cls`` from the fields the official config maps to, ``overrides``
  (e.g. ``dtype``) winning; ``num_classes`` is unused (a backbone has no
  classifier).
  """
  def from_official(official_config: Mapping[str, Any], num_classes=None, **overrides):
    del num_classes
    return cls(**{**fields_from_official(official_config), **overrides})
  from_official.__doc__ = (f"Builds :class:`{cls.__name__}` from an official backbone config "
                           f"(:func:`{fields_from_official.__name__}`); overrides win.")
  return from_official


def backbone_fields_from_official(cfg: Mapping[str, Any], kind: str, fields: Sequence[str], *,
                                  norm_default: Mapping[str, Any],
                                  norm_ok: Callable[[Mapping[str, Any]], bool],
                                  norm_support: str) -> dict:
  """The ``fields`` an official mmseg backbone config of type ``kind`` sets.

  Refuses, naming the option: another backbone type, inputs other than RGB, a
  ``norm_cfg`` that ``norm_ok`` rejects (``norm_support`` says what works) and
  an activation other than GELU. Family-specific options are the caller's.
  """
  if cfg.get("type", kind) != kind:
    raise ValueError(f"Not a {kind} config: {cfg.get('type')!r}")
  if cfg.get("in_channels", 3) != 3:
    raise ValueError("Only 3-channel inputs are supported")
  norm = cfg.get("norm_cfg", norm_default)
  if not norm_ok(norm):
    raise ValueError(f"{kind} norm_cfg {norm} is not supported ({norm_support})")
  act = cfg.get("act_cfg", {"type": "GELU"})
  if act.get("type") != "GELU":
    raise ValueError(f"{kind} act_cfg {act} is not supported (GELU only)")
  return {field: as_field(cfg[field]) for field in fields if field in cfg}


def check_segmentor_config(cfg: Mapping[str, Any]) -> None:
  """Rejects official segmentor configs with parts we do not port."""
  if cfg.get("type", "EncoderDecoder") != "EncoderDecoder":
    raise ValueError(f"Only EncoderDecoder segmentors are supported, got {cfg.get('type')!r}")
  for part in ("neck", "auxiliary_head"):
    if cfg.get(part):
      raise ValueError(f"The official config has a {part!r}, which this model lacks")


def offset_learning_variant(head: Mapping[str, Any], kind: str, norm_types: Sequence[str]) -> bool:
  """Whether an official ``kind`` head config is OffSeg's ``<kind>OffsetLearning``.

  Refuses any other head type, then checks the generic options
  (:func:`check_head_config`, with the norms ``norm_types`` allowed).
  """
  if head.get("type") not in (kind, kind + "OffsetLearning"):
    raise ValueError(f"Not a {kind} config: {head.get('type')!r}")
  check_head_config(head, norm_types)
  return head["type"] == kind + "OffsetLearning"


def check_head_config(head: Mapping[str, Any], norm_types: Sequence[str]) -> str:
  """Validates the generic ``BaseDecodeHead`` options; returns our norm name."""
  if head.get("align_corners", False):
    raise ValueError("align_corners=True heads are not supported")
  act = head.get("act_cfg", {"type": "ReLU"})
  if act.get("type") != "ReLU":
    raise ValueError(f"Head act_cfg {act} is not supported (ReLU only)")
  if len(head.get("in_channels", ())) != len(head.get("in_index", ())):
    raise ValueError("in_channels and in_index must have the same length")
  norm = head.get("norm_cfg") or {}
  if norm.get("type") not in norm_types:
    raise ValueError(f"Head norm_cfg {norm} is not supported (expected {norm_types})")
  return "gn" if norm["type"] == "GN" else "bn"


def check_in_channels(head: Mapping[str, Any], widths: Sequence[int]) -> None:
  """The head's declared ``in_channels`` must be the selected backbone widths."""
  selected = [widths[i] for i in head["in_index"]]
  if list(head["in_channels"]) != selected:
    raise ValueError(f"Head in_channels {list(head['in_channels'])} do not match the "
                     f"backbone outputs {selected} selected by in_index")
