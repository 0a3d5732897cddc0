"""Segmentation losses that compose: ``config.losses = {name: {weight, ...}}``.

``core`` holds the registry, cross-entropy and :func:`build_loss`; each method's
extra terms live in their own module and register on import (ECENet's mask and
diversity losses, FRM's pixel-contrastive loss).
"""

from __future__ import annotations

import importlib

from offseg_jax.losses.core import LOSSES, build_loss, cross_entropy, register

# Modules that register further losses; each is imported if present.
for _name in ("offseg_jax.losses.ecenet", "offseg_jax.losses.contrastive"):
  try:
    importlib.import_module(_name)
  except ModuleNotFoundError as e:
    if e.name != _name:
      raise

__all__ = ["LOSSES", "build_loss", "cross_entropy", "register"]
