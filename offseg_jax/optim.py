"""AdamW with the official parameter groups and warm-up + poly schedule.

Parameter groups follow mmengine's ``paramwise_cfg.custom_keys`` semantics
exactly: each parameter's *official* (torch state-dict) name is matched against
the keys by substring, keys tried **longest first, ties alphabetical**, and only
the first matching key applies (its ``lr_mult`` / ``decay_mult``, default 1).
With the OffSeg recipe ``{'pos_block': decay 0, 'norm': decay 0, 'head': lr x10}``
everything under ``decode_head.`` gets lr x10 *with* decay (even its norms, as
"head" beats "norm"), EfficientFormerV2's ``talking_head*`` also gets lr x10, and
backbone parameters named ``*norm*`` get no decay.

Parameters that official code never updates (``conv_seg`` of an Offset Learning
head, which gets no gradient) are frozen (``optax.set_to_zero``), so torch's
AdamW behaviour — skipping parameters without a gradient — is reproduced.
"""

from __future__ import annotations

from typing import Any, Mapping

import flax
import jax.numpy as jnp
import optax

from offseg_jax.conversion.core import torch_key


def lr_schedule(base_lr: float, total_steps: int, warmup_steps: int,
                warmup_start_factor: float = 1e-6, power: float = 1.0,
                end_lr: float = 0.0):
  """mmengine LinearLR warm-up over [0, W) then PolyLR over [W, total).

  lr(t) = base * (s + (1 - s) * t / (W - 1)) for t < W, reaching base at W - 1;
  lr(t) = (base - end) * (1 - (t - W) / (T - W - 1)) ** power + end after,
  exactly ``end`` at t = T - 1 (both endpoints as in mmengine).
  """
  decay = optax.polynomial_schedule(
      init_value=base_lr, end_value=end_lr, power=power,
      transition_steps=max(total_steps - warmup_steps - 1, 1))
  if warmup_steps <= 0:
    return decay
  warm = optax.linear_schedule(base_lr * warmup_start_factor, base_lr,
                               transition_steps=max(warmup_steps - 1, 1))
  return optax.join_schedules([warm, decay], boundaries=[warmup_steps])


def clipped(schedule, floor: float = 0.0):
  """``schedule`` never below ``floor`` (float round-off can end at -1e-11)."""
  return lambda step: jnp.maximum(schedule(step), floor)


def _match(name: str, custom_keys: Mapping[str, Mapping[str, float]]):
  for key in sorted(custom_keys, key=lambda k: (-len(k), k)):
    if key in name:
      return key
  return None


def param_groups(params, custom_keys: Mapping[str, Mapping[str, float]],
                 frozen: tuple[str, ...] = ()) -> tuple[Any, dict[str, tuple[float, float]]]:
  """Labels every parameter with its group.

  Returns ``(labels, groups)``: a pytree of group labels with the structure of
  ``params`` and ``{label: (lr_mult, decay_mult)}``; label ``'frozen'`` marks
  parameters whose official name contains one of ``frozen``.
  """
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
  labels, groups = {}, {}
  for path, _ in flat.items():
    name = torch_key("params", path)
    if any(f in name for f in frozen):
      labels[path] = "frozen"
      continue
    key = _match(name, custom_keys)
    opts = dict(custom_keys[key]) if key is not None else {}
    lr_mult = float(opts.get("lr_mult", 1.0))
    decay_mult = float(opts.get("decay_mult", 1.0))
    label = f"lr{lr_mult:g}_decay{decay_mult:g}"
    groups[label] = (lr_mult, decay_mult)
    labels[path] = label
  return flax.traverse_util.unflatten_dict(labels), groups


def frozen_names(params, model_config) -> tuple[str, ...]:
  """Official names of parameters that get no gradient in the official model."""
  del model_config
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
  names = {torch_key("params", p) for p in flat}
  # An Offset Learning head keeps conv_seg only for checkpoint compatibility.
  has_ol = any(".offset_learning." in n for n in names)
  return ("decode_head.conv_seg.",) if has_ol else ()


def build_optimizer(config, params):
  """optax AdamW (per-group lr/decay multipliers) and the lr schedule."""
  opt = config.optimizer
  schedule = clipped(lr_schedule(opt.lr, config.total_steps, opt.warmup_steps,
                                 opt.warmup_start_factor, opt.poly_power, opt.end_lr),
                     floor=min(opt.end_lr, opt.lr))
  custom = {k: dict(v) for k, v in dict(opt.custom_keys).items()}
  labels, groups = param_groups(params, custom, frozen_names(params, config.model))

  def group_tx(lr_mult, decay_mult):
    return optax.adamw(lambda step: schedule(step) * lr_mult, b1=opt.b1, b2=opt.b2,
                       eps=opt.eps, weight_decay=opt.weight_decay * decay_mult)

  transforms = {label: group_tx(*mults) for label, mults in groups.items()}
  transforms["frozen"] = optax.set_to_zero()
  tx = optax.multi_transform(transforms, labels)
  if opt.get("grad_clip_norm"):
    tx = optax.chain(optax.clip_by_global_norm(opt.grad_clip_norm), tx)
  return tx, schedule
