"""Model zoo: importing this package registers every component by name.

``build_model(config.model)`` builds a registered segmentor; see
``offseg_jax.registry`` for the interface every model follows.
"""

from __future__ import annotations

import importlib
from typing import Any, Mapping

import jax.numpy as jnp

from offseg_jax.models import compose, layers, segmentor
from offseg_jax.registry import BACKBONES, BLOCKS, HEADS, MODELS, NECKS

# Modules that register components. Each is imported if present so that
# families can land independently.
_FAMILIES = (
    "offseg_jax.models.tiny",
    "offseg_jax.models.efficientformer_v2",
    "offseg_jax.models.offseg_head",
    "offseg_jax.models.offseg",
    "offseg_jax.models.mit",
    "offseg_jax.models.segformer",
    "offseg_jax.models.mscan",
    "offseg_jax.models.segnext",
    "offseg_jax.models.swin",
    "offseg_jax.models.resnet",
    "offseg_jax.models.ecenet_head",
    "offseg_jax.models.van",
    "offseg_jax.models.fpn",
    "offseg_jax.models.frm",
    "offseg_jax.models.presets",
)

for _name in _FAMILIES:
  try:
    importlib.import_module(_name)
  except ModuleNotFoundError as e:   # a family not written yet
    if e.name != _name:
      raise


def build_model(model_config: Mapping[str, Any], num_classes: int):
  """Builds the model ``config.model`` describes.

  A preset (``name``) is built by its registered builder with the remaining
  fields as overrides; when the config swaps or extends a part (``backbone``,
  ``refiner``, ``neck``, ``head``, ``projection`` and their ``*_args``; see
  :mod:`offseg_jax.models.compose`), or ``name`` is '', the model is composed
  from the parts. ``dtype`` is the compute dtype; ``remat=True`` rematerialises
  the backbone (:func:`offseg_jax.models.segmentor.with_remat`); ``conv_impl``
  ('auto' | 'conv' | 'shift') is how convolutions are traced
  (``EncoderDecoder.conv_impl``). Configs without these fields (older
  checkpoints) get the defaults: float32, no remat, 'auto'.
  """
  cfg = {k: v for k, v in dict(model_config).items()
         if not (k in compose.SLOTS or k.endswith("_args"))}
  spec = compose.resolve_spec(model_config)
  name = cfg.pop("name", "")
  if "dtype" in cfg:
    cfg["dtype"] = jnp.dtype(cfg["dtype"])
  remat = bool(cfg.pop("remat", False))     # applied to the built EncoderDecoder
  conv_impl = layers.check_conv_impl(cfg.pop("conv_impl", "auto"))   # likewise
  uses_parts = any(dict(model_config).get(k) for k in dict(model_config)
                   if k in compose.SLOTS or k.endswith("_args"))
  if spec is not None and (uses_parts or not name):
    model = compose.build_composed(num_classes, spec, **cfg)
  else:
    model = MODELS.build(name, num_classes=num_classes, **cfg)
  if conv_impl != "auto":
    model = segmentor.with_conv_impl(model, conv_impl)
  return segmentor.with_remat(model) if remat else model


__all__ = ["BACKBONES", "BLOCKS", "HEADS", "MODELS", "NECKS", "build_model"]
