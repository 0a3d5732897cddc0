"""Swin Transformer backbone (mmseg's ``SwinTransformer``), in NHWC.

A 4x4/stride-4 patch embedding (with LayerNorm), then four stages of Swin
blocks. A block is

  x = x + DropPath(W-MSA or SW-MSA(LN x))      # windows of w x w tokens
  x = x + DropPath(FFN(LN x))                  # Linear(C, 4C), GELU, Linear(4C, C)

and blocks alternate between plain windows (even index) and windows shifted by
``w // 2`` (odd index). Each window attention adds a learned relative position
bias, read from a ((2w-1)^2, heads) table with an index computed here, not
stored. Between stages a PatchMerging halves the resolution and doubles the
width. Every stage output goes through its own LayerNorm (``norm0..norm3``)
before it is returned, *before* the merging.

Where mmseg differs from the original Swin, this follows mmseg, because the
checkpoints ECENet and UperNet use are mmseg's:
  * inputs of any size: the patch embedding pads bottom/right to a multiple of
    the patch size; each attention pads bottom/right to a multiple of the window
    (zeros, which are attended to; no mask for the padding) *before* shifting,
    builds the shift mask on the padded size and crops afterwards; PatchMerging
    pads odd sizes bottom/right. Shifted windows are used even when a map fits
    in one window.
  * PatchMerging flattens each 2x2 neighbourhood channel-major
    (``c * 4 + dy * 2 + dx``, the order of ``nn.Unfold``), not Swin's
    position-major concatenation, so the LayerNorm(4C) and reduction weights of
    mmseg checkpoints apply unchanged.

Submodules carry mmseg's names (``patch_embed.projection``,
``stages.{i}.blocks.{j}.attn.w_msa.qkv``, ``stages.{i}.blocks.{j}.ffn.layers.0.0``,
``stages.{i}.downsample.reduction``, ``norm{i}``...), so a checkpoint converts by
name; the ``relative_position_index`` buffers are ignored because the index is
recomputed.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Mapping, Sequence

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from offseg_jax.models import layers
from offseg_jax.models.family import as_field, backbone_from_official, register_backbones

_LN_EPS = 1e-5                     # torch nn.LayerNorm default, mmseg's LN
_MASK_VALUE = -100.0               # mmseg's additive mask across shifted-window borders
_trunc02 = nn.initializers.truncated_normal(stddev=0.02)

# Official state-dict keys that carry nothing for us: the relative position index
# is a deterministic buffer (recomputed by ``relative_position_index``).
TORCH_IGNORE = (r".*\.num_batches_tracked$", r".*\.relative_position_index$")

# mmseg sizes. Swin-T/S/B as in mmseg's UperNet configs; swin_b is ECENet's
# backbone (ImageNet-22K, 384 pretraining: window 12).
SWIN_SIZES = {
    "t": dict(embed_dims=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24),
              window_size=7, drop_path_rate=0.3),
    "s": dict(embed_dims=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24),
              window_size=7, drop_path_rate=0.3),
    "b": dict(embed_dims=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32),
              window_size=12, drop_path_rate=0.3),
}


# ----------------------------------------------------------------------------
# Static (trace-time) helpers.
# ----------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def relative_position_index(window_size: int) -> np.ndarray:
  """(N, N) int index into the ((2w-1)^2, heads) bias table, N = w * w.

  Token i at (hi, wi) attending to token j at (hj, wj) reads row
  ``(hi - hj + w - 1) * (2w - 1) + (wi - wj + w - 1)``; tokens are numbered
  row-major inside the window. This equals mmseg's ``relative_position_index``
  buffer.
  """
  w = window_size
  coords = einops.rearrange(np.stack(np.meshgrid(np.arange(w), np.arange(w), indexing="ij")),
                            "yx h w -> yx (h w)")
  rel = coords[:, :, None] - coords[:, None, :] + (w - 1)        # (2, N, N), >= 0
  return (rel[0] * (2 * w - 1) + rel[1]).astype(np.int32)


@functools.lru_cache(maxsize=None)
def shifted_window_mask(height: int, width: int, window_size: int, shift: int) -> np.ndarray:
  """(num_windows, N, N) additive mask of a shifted-window attention.

  ``height``/``width`` are the padded map size (multiples of the window). After
  the cyclic shift, each window may hold tokens of up to 4 regions that were
  not neighbours in the image; tokens of different regions get ``-100`` (mmseg's
  value, a soft -inf), the others 0. Regions are the 3 x 3 blocks cut by the
  slices [0, -w), [-w, -shift), [-shift, end) on each axis.
  """
  w = window_size
  region = np.zeros((height, width), np.int32)
  cuts = (slice(0, -w), slice(-w, -shift), slice(-shift, None))
  label = 0
  for rows in cuts:
    for cols in cuts:
      region[rows, cols] = label
      label += 1
  windows = einops.rearrange(region, "(nh wh) (nw ww) -> (nh nw) (wh ww)", wh=w, ww=w)
  different = windows[:, None, :] != windows[:, :, None]
  return np.where(different, _MASK_VALUE, 0.0).astype(np.float32)


def _corner_padding(size: int, kernel: int, stride: int) -> int:
  """mmcv ``AdaptivePadding('corner')``: bottom/right padding so windows tile ``size``."""
  out = math.ceil(size / stride)
  return max((out - 1) * stride + kernel - size, 0)


# ----------------------------------------------------------------------------
# Modules.
# ----------------------------------------------------------------------------

class WindowMSA(nn.Module):
  """Multi-head self-attention inside windows, with relative position bias.

  Input: (num_windows * B, N, C) tokens, windows batch-major (all windows of
  image 0 first), N = window_size ** 2; ``mask`` (num_windows, N, N) is added to
  every image's logits. torch names: ``qkv``, ``proj``,
  ``relative_position_bias_table``.
  """
  num_heads: int
  window_size: int
  qkv_bias: bool = True
  qk_scale: float | None = None
  attn_drop_rate: float = 0.0
  proj_drop_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, mask=None, train: bool = False):
    c = x.shape[-1]
    h = self.num_heads
    if c % h:
      raise ValueError(f"{self.name}: {c} channels not divisible into {h} heads")
    scale = self.qk_scale if self.qk_scale is not None else (c // h) ** -0.5
    w = self.window_size
    table = self.param("relative_position_bias_table", _trunc02, ((2 * w - 1) ** 2, h),
                       jnp.float32)

    qkv = layers.Linear(3 * c, use_bias=self.qkv_bias, dtype=self.dtype,
                        kernel_init=_trunc02, name="qkv")(x)
    # torch splits the 3C outputs as (3, heads, head_dim).
    q, k, v = einops.rearrange(qkv, "b n (three h d) -> three b h n d", three=3, h=h)
    logits = jnp.einsum("bhnd,bhmd->bhnm", q * scale, k).astype(jnp.float32)
    bias = table[relative_position_index(w)]                     # (N, N, heads)
    logits = logits + einops.rearrange(bias, "n m h -> h n m")
    if mask is not None:
      logits = einops.rearrange(logits, "(b nw) h n m -> b nw h n m", nw=mask.shape[0])
      logits = logits + jnp.asarray(mask)[None, :, None]
      logits = einops.rearrange(logits, "b nw h n m -> (b nw) h n m")
    weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    if train and self.attn_drop_rate > 0:
      weights = nn.Dropout(self.attn_drop_rate, deterministic=False)(weights)
    out = jnp.einsum("bhnm,bhmd->bhnd", weights, v)
    out = einops.rearrange(out, "b h n d -> b n (h d)")
    out = layers.Linear(c, dtype=self.dtype, kernel_init=_trunc02, name="proj")(out)
    if train and self.proj_drop_rate > 0:
      out = nn.Dropout(self.proj_drop_rate, deterministic=False)(out)
    return out


class ShiftWindowMSA(nn.Module):
  """(Shifted) window attention on an NHWC map, mmseg's ``ShiftWindowMSA``.

  Pads bottom/right to a multiple of the window, rolls by ``-shift`` (when
  ``shift > 0``), partitions into windows, attends (``w_msa``) with the shift
  mask, merges, rolls back and crops. DropPath on the result (mmseg applies it
  here, before the residual add).
  """
  num_heads: int
  window_size: int
  shift_size: int = 0
  qkv_bias: bool = True
  qk_scale: float | None = None
  attn_drop_rate: float = 0.0
  proj_drop_rate: float = 0.0
  drop_path_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    _, height, width, _ = x.shape
    w, s = self.window_size, self.shift_size
    if not 0 <= s < w:
      raise ValueError(f"{self.name}: shift_size {s} must be in [0, window_size={w})")
    pad_b, pad_r = (-height) % w, (-width) % w
    # Padding comes before the shift, so padded zeros take part in the roll.
    x = jnp.pad(x, ((0, 0), (0, pad_b), (0, pad_r), (0, 0)))
    hp, wp = height + pad_b, width + pad_r
    mask = None
    if s > 0:
      x = jnp.roll(x, (-s, -s), axis=(1, 2))
      mask = shifted_window_mask(hp, wp, w, s)
    windows = einops.rearrange(x, "b (nh wh) (nw ww) c -> (b nh nw) (wh ww) c", wh=w, ww=w)
    windows = WindowMSA(self.num_heads, w, self.qkv_bias, self.qk_scale, self.attn_drop_rate,
                        self.proj_drop_rate, dtype=self.dtype, name="w_msa")(
                            windows, mask, train)
    x = einops.rearrange(windows, "(b nh nw) (wh ww) c -> b (nh wh) (nw ww) c",
                         nh=hp // w, nw=wp // w, wh=w)
    if s > 0:
      x = jnp.roll(x, (s, s), axis=(1, 2))
    x = x[:, :height, :width]
    return layers.DropPath(self.drop_path_rate)(x, train)


class FFN(nn.Module):
  """mmcv FFN with two fcs: Linear(C, hidden), GELU, Linear(hidden, C); dropouts.

  torch names ``layers.0.0`` and ``layers.1``. Returns the branch only (after
  DropPath); the caller adds the residual.
  """
  hidden: int
  drop_rate: float = 0.0
  drop_path_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    c = x.shape[-1]
    y = layers.Linear(self.hidden, dtype=self.dtype, kernel_init=_trunc02, name="layers.0.0")(x)
    y = layers.gelu(y)
    if train and self.drop_rate > 0:
      y = nn.Dropout(self.drop_rate, deterministic=False)(y)
    y = layers.Linear(c, dtype=self.dtype, kernel_init=_trunc02, name="layers.1")(y)
    if train and self.drop_rate > 0:
      y = nn.Dropout(self.drop_rate, deterministic=False)(y)
    return layers.DropPath(self.drop_path_rate)(y, train)


class SwinBlock(nn.Module):
  """x + SW-MSA(LN x), then x + FFN(LN x); shifted windows when ``shift``."""
  num_heads: int
  window_size: int = 7
  shift: bool = False
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  qk_scale: float | None = None
  drop_rate: float = 0.0
  attn_drop_rate: float = 0.0
  drop_path_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    c = x.shape[-1]
    y = layers.LayerNorm(_LN_EPS, dtype=self.dtype, name="norm1")(x)
    y = ShiftWindowMSA(self.num_heads, self.window_size,
                       self.window_size // 2 if self.shift else 0, self.qkv_bias,
                       self.qk_scale, self.attn_drop_rate, self.drop_rate,
                       self.drop_path_rate, dtype=self.dtype, name="attn")(y, train)
    x = x + y
    y = layers.LayerNorm(_LN_EPS, dtype=self.dtype, name="norm2")(x)
    y = FFN(int(self.mlp_ratio * c), self.drop_rate, self.drop_path_rate, dtype=self.dtype,
            name="ffn")(y, train)
    return x + y


class PatchEmbed(nn.Module):
  """Non-overlapping patch embedding: corner padding, conv (k, stride s), LayerNorm."""
  features: int
  patch_size: int = 4
  stride: int = 4
  patch_norm: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    k, s = self.patch_size, self.stride
    pad_b = _corner_padding(x.shape[1], k, s)
    pad_r = _corner_padding(x.shape[2], k, s)
    x = layers.Conv2d(self.features, k, s, padding=((0, pad_b), (0, pad_r)),
                      dtype=self.dtype, name="projection")(x)
    if self.patch_norm:
      x = layers.LayerNorm(_LN_EPS, dtype=self.dtype, name="norm")(x)
    return x


class PatchMerging(nn.Module):
  """mmseg PatchMerging: 2x2 neighbourhoods (stride ``stride``) -> LN(4C) -> Linear(2C).

  The 4C feature of an output pixel is ordered ``c * 4 + dy * 2 + dx`` (channel-
  major, as ``nn.Unfold`` flattens it), which is what mmseg checkpoints expect.
  Odd sizes are padded bottom/right with zeros first.
  """
  features: int
  stride: int = 2
  patch_norm: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    k, s = 2, self.stride
    pad_b = _corner_padding(x.shape[1], k, s)
    pad_r = _corner_padding(x.shape[2], k, s)
    x = jnp.pad(x, ((0, 0), (0, pad_b), (0, pad_r), (0, 0)))
    out_h = (x.shape[1] - k) // s + 1
    out_w = (x.shape[2] - k) // s + 1
    # taps[dy * 2 + dx][b, i, j] = x[b, i * s + dy, j * s + dx]
    taps = [x[:, dy:dy + (out_h - 1) * s + 1:s, dx:dx + (out_w - 1) * s + 1:s]
            for dy in range(k) for dx in range(k)]
    x = einops.rearrange(jnp.stack(taps, axis=-1), "b h w c k -> b h w (c k)")
    if self.patch_norm:
      x = layers.LayerNorm(_LN_EPS, dtype=self.dtype, name="norm")(x)
    return layers.Linear(self.features, use_bias=False, dtype=self.dtype,
                         kernel_init=_trunc02, name="reduction")(x)


class SwinTransformer(nn.Module):
  """Swin backbone: NHWC image -> tuple of NHWC maps (strides 4, 8, 16, 32).

  Fields mirror mmseg's ``SwinTransformer`` constructor. Stage i has
  ``embed_dims * 2**i`` channels. Stochastic depth grows linearly from 0 to
  ``drop_path_rate`` over all blocks (rng stream ``'dropout'``, as are the
  dropouts). Any input size works (see the module docstring for the padding).
  """
  embed_dims: int = 96
  patch_size: int = 4
  window_size: int = 7
  mlp_ratio: float = 4.0
  depths: Sequence[int] = (2, 2, 6, 2)
  num_heads: Sequence[int] = (3, 6, 12, 24)
  strides: Sequence[int] = (4, 2, 2, 2)
  out_indices: Sequence[int] = (0, 1, 2, 3)
  qkv_bias: bool = True
  qk_scale: float | None = None
  patch_norm: bool = True
  drop_rate: float = 0.0
  attn_drop_rate: float = 0.0
  drop_path_rate: float = 0.1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images, train: bool = False):
    n_stages = len(self.depths)
    if not n_stages == len(self.num_heads) == len(self.strides):
      raise ValueError("depths, num_heads and strides must have one entry per stage")
    if self.strides[0] != self.patch_size:
      raise ValueError(f"strides[0]={self.strides[0]} must equal patch_size="
                       f"{self.patch_size} (non-overlapping patch embedding)")
    if any(not 0 <= i < n_stages for i in self.out_indices):
      raise ValueError(f"out_indices {tuple(self.out_indices)} out of range for "
                       f"{n_stages} stages")
    rates = layers.drop_path_rates(self.depths, self.drop_path_rate)
    x = PatchEmbed(self.embed_dims, self.patch_size, self.strides[0], self.patch_norm,
                   dtype=self.dtype, name="patch_embed")(images)
    if train and self.drop_rate > 0:           # mmseg's drop_after_pos
      x = nn.Dropout(self.drop_rate, deterministic=False)(x)
    outs = []
    for i in range(n_stages):
      width = self.embed_dims * 2 ** i
      for j, rate in enumerate(rates[i]):
        x = SwinBlock(self.num_heads[i], self.window_size, j % 2 == 1, self.mlp_ratio,
                      self.qkv_bias, self.qk_scale, self.drop_rate, self.attn_drop_rate,
                      rate, dtype=self.dtype, name=f"stages.{i}.blocks.{j}")(x, train)
      if i in self.out_indices:
        outs.append(layers.LayerNorm(_LN_EPS, dtype=self.dtype, name=f"norm{i}")(x))
      if i < n_stages - 1:
        x = PatchMerging(2 * width, self.strides[i + 1], self.patch_norm, dtype=self.dtype,
                         name=f"stages.{i}.downsample")(x)
    return tuple(outs)


# ----------------------------------------------------------------------------
# Official config mapping and registration.
# ----------------------------------------------------------------------------

_FIELDS = ("embed_dims", "patch_size", "window_size", "mlp_ratio", "depths", "num_heads",
           "strides", "out_indices", "qkv_bias", "qk_scale", "patch_norm", "drop_rate",
           "attn_drop_rate", "drop_path_rate")
# Constructor options that do not change the computation: pretraining size (used
# only by the absolute position embedding, which we refuse), activation
# checkpointing, weight loading and init.
_NO_EFFECT = ("type", "pretrain_img_size", "in_channels", "with_cp", "pretrained",
              "convert_weights", "init_cfg", "pretrain_style")


def swin_config_from_official(cfg: Mapping[str, Any]) -> dict:
  """Maps an mmseg ``SwinTransformer`` config onto :class:`SwinTransformer` fields.

  Raises ``ValueError`` naming the option for anything not ported: another
  backbone type, ``use_abs_pos_embed=True``, ``frozen_stages``, a norm other
  than LayerNorm (eps 1e-5), an activation other than GELU, unknown keys.
  """
  if cfg.get("type", "SwinTransformer") != "SwinTransformer":
    raise ValueError(f"Not a SwinTransformer config: type={cfg.get('type')!r}")
  unknown = sorted(set(cfg) - set(_FIELDS) - set(_NO_EFFECT)
                   - {"use_abs_pos_embed", "frozen_stages", "norm_cfg", "act_cfg"})
  if unknown:
    raise ValueError(f"SwinTransformer option(s) {unknown} are not supported")
  if cfg.get("use_abs_pos_embed", False):
    raise ValueError("SwinTransformer option use_abs_pos_embed=True is not supported "
                     "(no absolute position embedding is ported)")
  if cfg.get("frozen_stages", -1) != -1:
    raise ValueError(f"SwinTransformer option frozen_stages={cfg['frozen_stages']} is not "
                     "supported (freeze parameters in the optimizer instead)")
  norm = dict(cfg.get("norm_cfg") or {"type": "LN"})
  if (norm.get("type") != "LN" or norm.get("eps", _LN_EPS) != _LN_EPS
      or not norm.get("requires_grad", True)):
    raise ValueError(f"SwinTransformer option norm_cfg={norm} is not supported "
                     "(trainable LN with eps 1e-5 only)")
  act = dict(cfg.get("act_cfg") or {"type": "GELU"})
  if act != {"type": "GELU"}:
    raise ValueError(f"SwinTransformer option act_cfg={act} is not supported (GELU only)")
  return {f: as_field(cfg[f]) for f in _FIELDS if f in cfg}


swin_from_official = backbone_from_official(SwinTransformer, swin_config_from_official)


def _size_doc(name: str) -> str:
  size = name[len("swin_"):]
  fields = SWIN_SIZES[size]
  return (f"Swin-{size.upper()} (mmseg sizes: embed {fields['embed_dims']}, depths "
          f"{fields['depths']}, window {fields['window_size']}).")


register_backbones(SwinTransformer, {f"swin_{size}": f for size, f in SWIN_SIZES.items()},
                   family="swin", from_official=swin_from_official, torch_ignore=TORCH_IGNORE,
                   doc=_size_doc)
