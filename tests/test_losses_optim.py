"""Cross-entropy normaliser, mmengine parameter groups and the lr schedule."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from experiments.configs import common
from offseg_jax import losses, optim


def _np_ce(logits, labels, ignore=255):
  z = logits - logits.max(-1, keepdims=True)
  logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
  valid = labels != ignore
  nll = -np.take_along_axis(logp, np.where(valid, labels, 0)[..., None], -1)[..., 0]
  return np.where(valid, nll, 0.0), valid


def test_cross_entropy_counts_ignored_pixels_in_the_denominator():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 6, 6, 5)).astype(np.float32)
  labels = rng.integers(0, 5, size=(2, 6, 6))
  labels[0, :3] = 255
  nll, valid = _np_ce(logits, labels)
  got = losses.cross_entropy(jnp.asarray(logits), {}, jnp.asarray(labels))
  np.testing.assert_allclose(got, nll.sum() / labels.size, rtol=1e-5)
  got = losses.cross_entropy(jnp.asarray(logits), {}, jnp.asarray(labels), avg_non_ignore=True)
  np.testing.assert_allclose(got, nll.sum() / valid.sum(), rtol=1e-5)


def test_cross_entropy_upsamples_logits_to_the_label_size():
  logits = jnp.zeros((1, 2, 2, 3)).at[..., 1].set(5.0)
  labels = jnp.ones((1, 8, 8), jnp.int32)
  loss = losses.cross_entropy(logits, {}, labels)
  # logsumexp - logit loses ~1e-5 relative to float32 rounding when the loss is small.
  np.testing.assert_allclose(loss, -jax.nn.log_softmax(jnp.array([0.0, 5.0, 0.0]))[1], rtol=2e-5)


def test_build_loss_weights_and_rejects_unknown_names():
  fn = losses.build_loss({"cross_entropy": {"weight": 0.5}})
  logits = jnp.zeros((1, 2, 2, 3))
  total, terms = fn(logits, {}, jnp.zeros((1, 2, 2), jnp.int32))
  np.testing.assert_allclose(total, 0.5 * terms["cross_entropy"])
  with pytest.raises(ValueError, match="dice_typo"):
    losses.build_loss({"dice_typo": {}})


def _groups_for(names):
  params = {}
  for n in names:
    node = params
    parts = n.split(".")
    for p in parts[:-1]:
      node = node.setdefault(p, {})
    node[parts[-1]] = jnp.zeros(1)
  keys = {k: dict(v) for k, v in dict(common.base_config().optimizer.custom_keys).items()}
  labels, groups = optim.param_groups(params, keys, optim.frozen_names(params, None))
  out = {}
  for n in names:
    node = labels
    for p in n.split("."):
      node = node[p]
    out[n] = "frozen" if node == "frozen" else groups[node]
  return out


def test_param_groups_follow_mmengine_longest_key_first_rule():
  g = _groups_for([
      "backbone.network.0.0.mlp.norm1.scale",           # norm -> no decay
      "backbone.patch_embed.1.scale",                   # BN without 'norm' in its name: decay
      "backbone.network.4.7.token_mixer.talking_head1.kernel",   # 'head' -> lr x10
      "decode_head.align.gn.scale",                     # head beats norm: lr x10 with decay
      "decode_head.offset_learning.mask_norm.scale",
      "decode_head.conv_seg.kernel",                    # unused with Offset Learning: frozen
      "decode_head.offset_learning.cls_repr",
  ])
  assert g["backbone.network.0.0.mlp.norm1.scale"] == (1.0, 0.0)
  assert g["backbone.patch_embed.1.scale"] == (1.0, 1.0)
  assert g["backbone.network.4.7.token_mixer.talking_head1.kernel"] == (10.0, 1.0)
  assert g["decode_head.align.gn.scale"] == (10.0, 1.0)
  assert g["decode_head.offset_learning.mask_norm.scale"] == (10.0, 1.0)
  assert g["decode_head.conv_seg.kernel"] == "frozen"
  assert g["decode_head.offset_learning.cls_repr"] == (10.0, 1.0)


def test_schedule_has_mmengine_endpoints():
  s = optim.lr_schedule(6e-5, total_steps=160_000, warmup_steps=1500)
  # float32 cancellation in optax (init - end) + end: absolute error ~2e-12.
  np.testing.assert_allclose(s(0), 6e-5 * 1e-6, atol=5e-12)
  np.testing.assert_allclose(s(1499), 6e-5, rtol=1e-6)
  np.testing.assert_allclose(s(1500), 6e-5, rtol=1e-6)
  np.testing.assert_allclose(s(1500 + 79_249), 6e-5 * (1 - 79_249 / 158_499), rtol=1e-5)
  assert abs(float(s(159_999))) < 1e-12


def test_adamw_groups_apply_lr_and_decay_multipliers():
  c = ml_collections.ConfigDict({
      "total_steps": 10, "model": {"name": "x"},
      "optimizer": dict(lr=0.1, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.5, warmup_steps=0,
                        warmup_start_factor=1e-6, poly_power=1.0, end_lr=0.0, grad_clip_norm=0.0,
                        custom_keys={"norm": {"decay_mult": 0.0}, "head": {"lr_mult": 10.0}})})
  params = {"backbone": {"norm": {"scale": jnp.ones(2)}, "w": {"kernel": jnp.ones(2)}},
            "decode_head": {"w": {"kernel": jnp.ones(2)}}}
  tx, _ = optim.build_optimizer(c, params)
  grads = jax.tree_util.tree_map(jnp.zeros_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  # Zero gradients: only decoupled weight decay moves parameters, by -lr*mult*wd*p.
  np.testing.assert_allclose(updates["backbone"]["norm"]["scale"], 0.0)
  np.testing.assert_allclose(updates["backbone"]["w"]["kernel"], -0.1 * 0.5, rtol=1e-6)
  np.testing.assert_allclose(updates["decode_head"]["w"]["kernel"], -1.0 * 0.5, rtol=1e-6)
