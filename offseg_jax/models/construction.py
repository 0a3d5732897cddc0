"""Model construction shared by the trainer, the evaluator and the tools.

* :func:`create_model`: the registered model ``config.model`` describes;
* :func:`init_variables`: its variables from a dummy crop-sized batch;
* :func:`size_divisor`: the multiple every input side must be padded to.

A part (backbone, refiner, neck, head, or the model itself) that only works on
some input sizes declares it with a ``size_divisor`` class attribute, e.g.
EfficientFormerV2's strided attention reshapes the stride-16 map into 2x2
blocks, so its inputs must be multiples of 32. Parts that declare nothing accept
any size (:data:`DEFAULT_SIZE_DIVISOR`). Whole-image inference and ``predict``
pad every image to :func:`size_divisor` (bottom/right, the mean colour) and crop
the logits back, so any image size works with every model.
"""

from __future__ import annotations

import math
from typing import Any

from clu import parameter_overview
import flax
import jax
import jax.numpy as jnp

from offseg_jax.models import build_model

# Parts without a ``size_divisor`` attribute take inputs of any size.
DEFAULT_SIZE_DIVISOR = 1
# The submodules of an EncoderDecoder that may declare a divisor.
_PART_ATTRIBUTES = ("backbone", "refiner", "neck", "decode_head", "projection")


def create_model(config, num_classes: int):
  """The registered model of ``config.model`` (dtype given as a string)."""
  model_cfg = dict(config.model)
  if "dtype" in model_cfg:
    model_cfg["dtype"] = jnp.dtype(model_cfg["dtype"])
  return build_model(model_cfg, num_classes)


def init_variables(model, config, rng, image_size=None) -> dict[str, Any]:
  """``{'params', 'batch_stats'}`` from a dummy batch of one.

  Args:
    model: a registered model.
    config: experiment config; the dummy image is ``config.data.crop_size``.
    rng: PRNG key.
    image_size: optional (h, w) of the dummy image instead of the crop.
  """
  h, w = image_size if image_size is not None else config.data.crop_size
  dummy = jnp.zeros((1, int(h), int(w), 3), jnp.float32)
  p_rng, d_rng, h_rng = jax.random.split(rng, 3)
  variables = model.init({"params": p_rng, "dropout": d_rng, "ham": h_rng}, dummy, train=False)
  return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}


def size_divisor(model) -> int:
  """The least common multiple of the ``size_divisor`` its parts declare.

  Reads the attribute on the model and on its backbone, refiner, neck, decode
  head and projection (absent parts and attributes count as
  :data:`DEFAULT_SIZE_DIVISOR`). Works for any object with ``apply`` (fakes in
  tests declare nothing and get the default).
  """
  divisor = DEFAULT_SIZE_DIVISOR
  parts = [model] + [getattr(model, name, None) for name in _PART_ATTRIBUTES]
  for part in parts:
    value = getattr(type(part), "size_divisor", None) if part is not None else None
    if value:
      divisor = math.lcm(divisor, int(value))
  return divisor


def parameter_table(params) -> str:
  """One row per parameter (path, shape, dtype, size) and the total, as text.

  ``params`` may be concrete or abstract (``jax.eval_shape`` output): the table
  lists shapes only, so it never reads parameter values.
  """
  params = flax.core.unfreeze(params)
  return parameter_overview.get_parameter_overview(params, include_stats=False)
