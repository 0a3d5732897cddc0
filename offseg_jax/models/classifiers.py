"""Per-pixel classifiers that end a decode head, selectable by name.

Offset Learning (arXiv 2508.08811) replaces a head's 1x1 classifier; every head in
this project ends with :func:`classify`, so any head switches to it with one
config field (``classifier='offset_learning'``).

Kinds:
  * ``'conv'``: mmseg's ``conv_seg`` (Dropout2d + 1x1 conv with bias).
  * ``'offset_learning'``: class-offset and feature-offset branches (both on).
  * ``'class_offset'`` / ``'feature_offset'``: one branch only (the paper's
    Table 6 ablation rows).
"""

from __future__ import annotations

from einops import rearrange
import flax.linen as nn
import jax
import jax.numpy as jnp

from offseg_jax.models import layers

KINDS = ("conv", "offset_learning", "class_offset", "feature_offset")

_trunc02 = nn.initializers.truncated_normal(stddev=0.02)


class OffsetLearning(nn.Module):
  """Offset Learning: logits = LN_K((E + dE)(W + dW)^T), NHWC in, NHWC out.

  A = W E^T is the coupled attention (no scaling). dW = P_cls(softmax_N(A) E)
  (class offset, softmax over pixels) and dE = P_feat(softmax_K(A)^T W) (feature
  offset, softmax over classes), both from the original E and W. The LayerNorm
  over the class axis (eps 1e-5) is in the official code though not in the paper.
  Torch names: ``cls_repr`` (1, K, C), ``cls_offset_proj`` / ``feat_offset_proj``
  (bias-free Linear), ``mask_norm`` (LayerNorm over K).
  """
  num_classes: int
  use_class_offset: bool = True
  use_feature_offset: bool = True
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, h, _, c = x.shape
    k = self.num_classes
    cls_repr = self.param("cls_repr", _trunc02, (1, k, c), jnp.float32)
    e = rearrange(x, "b h w c -> b (h w) c").astype(jnp.float32)    # pixels as tokens
    wmat = jnp.broadcast_to(cls_repr, (b, k, c))
    hp = jax.lax.Precision.HIGHEST if self.dtype == jnp.float32 else None
    attn = jnp.einsum("bkc,bnc->bkn", wmat.astype(self.dtype), e.astype(self.dtype),
                      precision=hp).astype(jnp.float32)
    # Both projections exist in every variant so checkpoints stay interchangeable.
    cls_proj = layers.Linear(c, use_bias=False, dtype=self.dtype, kernel_init=_trunc02,
                             name="cls_offset_proj")
    feat_proj = layers.Linear(c, use_bias=False, dtype=self.dtype, kernel_init=_trunc02,
                              name="feat_offset_proj")
    w_adj, e_adj = wmat, e
    if self.use_class_offset or self.is_initializing():
      a_cls = jax.nn.softmax(attn, axis=-1)                         # over pixels
      f_cls = jnp.einsum("bkn,bnc->bkc", a_cls.astype(self.dtype), e.astype(self.dtype),
                         precision=hp)
      delta_w = cls_proj(f_cls).astype(jnp.float32)
      if self.use_class_offset:
        w_adj = wmat + delta_w
    if self.use_feature_offset or self.is_initializing():
      a_pos = jax.nn.softmax(attn, axis=1)                          # over classes
      f_pos = jnp.einsum("bkn,bkc->bnc", a_pos.astype(self.dtype), wmat.astype(self.dtype),
                         precision=hp)
      delta_e = feat_proj(f_pos).astype(jnp.float32)
      if self.use_feature_offset:
        e_adj = e + delta_e
    logits = jnp.einsum("bnc,bkc->bnk", e_adj.astype(self.dtype), w_adj.astype(self.dtype),
                        precision=hp).astype(jnp.float32)
    logits = layers.LayerNorm(1e-5, name="mask_norm")(logits)
    return rearrange(logits, "b (h w) k -> b h w k", h=h)


def classify(x, *, kind: str, num_classes: int, dropout_ratio: float = 0.1,
             train: bool = False, dtype=jnp.float32):
  """Ends a decode head. Call inside the head's ``@nn.compact`` method.

  Submodules are created in the calling head's scope under the official names
  ``conv_seg`` and ``offset_learning``. With an Offset Learning kind, ``conv_seg``
  still exists (as in every official checkpoint and in the papers' parameter
  counts) but is never used: it receives no gradient and the optimizer freezes
  it (see ``offseg_jax.optim``).
  """
  if kind not in KINDS:
    raise ValueError(f"Unknown classifier {kind!r}; choose one of {KINDS}")
  conv_seg = layers.Conv2d(num_classes, 1, use_bias=True, dtype=dtype,
                           kernel_init=nn.initializers.normal(0.01), name="conv_seg")
  if kind == "conv":
    if train and dropout_ratio > 0:
      # Dropout2d: whole channels are dropped per sample.
      x = nn.Dropout(dropout_ratio, broadcast_dims=(1, 2), deterministic=False)(x)
    return conv_seg(x).astype(jnp.float32)
  # Materialise the unused conv_seg params on a 1-pixel dummy: XLA drops it.
  conv_seg(jnp.zeros((1, 1, 1, x.shape[-1]), dtype))
  ol = OffsetLearning(num_classes,
                      use_class_offset=kind in ("offset_learning", "class_offset"),
                      use_feature_offset=kind in ("offset_learning", "feature_offset"),
                      dtype=dtype, name="offset_learning")
  return ol(x)
