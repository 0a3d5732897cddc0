"""Model zoo: importing this package registers every component by name.

``build_model(config.model)`` builds a registered segmentor; see
``offseg_jax.registry`` for the interface every model follows.
"""

from __future__ import annotations

import importlib
from typing import Any, Mapping

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
  """Builds ``model_config['name']`` with the remaining fields as overrides."""
  cfg = dict(model_config)
  name = cfg.pop("name")
  return MODELS.build(name, num_classes=num_classes, **cfg)


__all__ = ["BACKBONES", "BLOCKS", "HEADS", "MODELS", "NECKS", "build_model"]
