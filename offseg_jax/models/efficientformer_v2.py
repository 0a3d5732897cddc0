"""EfficientFormerV2 as OffSeg's segmentation backbone (``efficientformerv2_*_feat``).

A conv stem (stride 4) followed by a 7-entry ``network``: stage0, Emb0, stage1,
Emb1, stage2, Emb2, stage3. Entries 0, 2, 4, 6 are the outputs (strides 4, 8, 16,
32, no extra norm). Stages hold FFN blocks (conv MLP with a depthwise middle conv)
and, for the last ``vit_num`` blocks of stages 2 and 3, AttnFFN blocks that add an
``Attention4D`` token mixer (talking heads, a learned position bias; stride-2 in
stage 2). Emb2 downsamples with attention (``Attention4DDownsample``, whose
queries come from a local-global ``LGQuery``) plus a strided conv.

Position-bias tables are sized for ``resolution`` (512 in every official config).
At another input size the gathered (heads, N_tab, N_tab) bias is resized to the
actual (N_q, N_k) with PyTorch's bicubic (A = -0.75), treating the pair matrix as
an image, exactly as the segmentation copy of the official code does.

Module names follow the official state dict (``patch_embed.0``, ``network.4.7
.token_mixer.q.0`` ...), so a checkpoint converts by name. The index buffers
(``attention_bias_idxs*``) and the unused ImageNet ``attention_biases`` buffers are
not stored: the indices are recomputed here.
"""

from __future__ import annotations

import functools
import math
from typing import Any, ClassVar, Sequence

from einops import rearrange
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from offseg_jax.models import layers
from offseg_jax.models.family import register_backbones

Dtype = Any

# Per-variant architecture, from the official segmentation configs.
WIDTHS = {
    "S1": (32, 48, 120, 224),
    "S2": (32, 64, 144, 288),
    "L": (40, 80, 192, 384),
}
DEPTHS = {
    "S1": (3, 3, 9, 6),
    "S2": (4, 4, 12, 8),
    "L": (5, 5, 15, 10),
}
EXPANSION_RATIOS = {
    "S1": ((4,) * 3, (4,) * 3, (4, 4, 3, 3, 3, 3, 4, 4, 4), (4, 4, 3, 3, 4, 4)),
    "S2": ((4,) * 4, (4,) * 4, (4, 4) + (3,) * 6 + (4,) * 4, (4, 4, 3, 3, 3, 3, 4, 4)),
    "L": ((4,) * 5, (4,) * 5, (4,) * 4 + (3,) * 7 + (4,) * 4, (4, 4, 4) + (3,) * 4 + (4,) * 3),
}
VIT_NUM = {"S1": 2, "S2": 4, "L": 6}
# Hard-coded in the official classes (a config cannot change them).
DROP_PATH_RATE = {"S1": 0.0, "S2": 0.02, "L": 0.1}


# ----------------------------------------------------------------------------
# Initialisers (training from scratch; real runs load ImageNet weights).
# ----------------------------------------------------------------------------

def _uniform(bound: float):
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def _torch_conv(features, kernel_size, in_features, *, stride=1, padding=0, groups=1,
                dtype=jnp.float32, name=None):
  """A Conv2d initialised like an untouched ``torch.nn.Conv2d`` (U(+-1/sqrt(fan_in)))."""
  fan_in = (in_features // groups) * kernel_size * kernel_size
  return layers.Conv2d(
      features, kernel_size, stride, padding, groups=groups, dtype=dtype,
      kernel_init=nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform"),
      bias_init=_uniform(1 / math.sqrt(fan_in)), name=name)


# ----------------------------------------------------------------------------
# PyTorch bicubic resize and the position-bias index.
# ----------------------------------------------------------------------------

_CUBIC_A = -0.75   # torch's bicubic constant (Keys' kernel, unlike jax.image's -0.5)


def _cubic_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
  """Source indices (n_out, 4) and weights (n_out, 4) of torch bicubic, one axis.

  align_corners=False: src = (dst + 1/2) * n_in / n_out - 1/2, not clamped; the
  base index is min(floor(src), n_in - 1), the fraction is clamped to [0, 1], and
  the four taps base-1 .. base+2 are clamped into the input (edge replication).
  """
  scale = np.float32(n_in) / np.float32(n_out)
  src = scale * (np.arange(n_out, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5)
  base = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
  t = np.clip(src - base, 0.0, 1.0).astype(np.float64)
  a = _CUBIC_A

  def near(z):   # |z| <= 1
    return ((a + 2) * z - (a + 3)) * z * z + 1

  def far(z):    # 1 < |z| < 2
    return ((a * z - 5 * a) * z + 8 * a) * z - 4 * a

  weights = np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)
  taps = np.clip(base[:, None] + np.arange(-1, 3)[None, :], 0, n_in - 1)
  return taps, weights.astype(np.float32)


def resize_bicubic(x, size: Sequence[int], axes: Sequence[int] = (-2, -1)):
  """torch ``F.interpolate(mode='bicubic', align_corners=False)`` over two axes.

  Separable: four gathers per resized axis, no interpolation matrix. Works for
  up- and down-sampling (torch does not antialias bicubic either). Axes whose size
  already matches are left untouched (torch's weights are then exactly 0/1/0/0).
  """
  for axis, n_out in zip(axes, size):
    axis = axis % x.ndim
    n_in = x.shape[axis]
    if n_in == int(n_out):
      continue
    taps, weights = _cubic_taps(n_in, int(n_out))
    bshape = [1] * x.ndim
    bshape[axis] = int(n_out)
    out = 0
    for j in range(4):
      w = jnp.asarray(weights[:, j], x.dtype).reshape(bshape)
      out = out + jnp.take(x, taps[:, j], axis=axis) * w
    x = out
  return x


@functools.lru_cache(maxsize=None)
def attention_bias_index(q_res: int, k_res: int, q_step: int = 1) -> tuple[np.ndarray, int]:
  """The official ``attention_bias_idxs_seg`` and the size of its bias table.

  Queries sit on a q_res x q_res grid whose point (r, c) is at (q_step*r, q_step*c)
  of the k_res x k_res key grid. Each distinct (|dr|, |dc|) gets one table entry,
  numbered in order of first appearance scanning queries then keys row-major.
  """
  qr, qc = np.divmod(np.arange(q_res * q_res), q_res)
  kr, kc = np.divmod(np.arange(k_res * k_res), k_res)
  dr = np.abs(q_step * qr[:, None] - kr[None, :])
  dc = np.abs(q_step * qc[:, None] - kc[None, :])
  code = (dr * (dc.max() + 1) + dc).ravel()
  _, first, inverse = np.unique(code, return_index=True, return_inverse=True)
  rank = np.empty(len(first), np.int64)
  rank[np.argsort(first)] = np.arange(len(first))
  return rank[inverse].reshape(q_res * q_res, k_res * k_res).astype(np.int32), len(first)


def _position_bias(module: nn.Module, num_heads: int, q_res: int, k_res: int, q_step: int,
                   n_q: int, n_k: int):
  """Declares ``attention_biases_seg`` in ``module`` and returns the (heads, n_q, n_k) bias.

  The table is gathered by the official index on its q_res/k_res grids and then
  resized with torch bicubic to the actual token counts (a no-op at the size the
  table was made for).
  """
  idx, n_offsets = attention_bias_index(q_res, k_res, q_step)
  table = module.param("attention_biases_seg", nn.initializers.zeros,
                       (num_heads, n_offsets), jnp.float32)
  return resize_bicubic(table[:, idx], (n_q, n_k))


class HeadMixer(nn.Module):
  """A 1x1 conv across the head axis of (B, heads, N, M) attention (talking heads).

  Parameters keep the torch Conv2d layout (kernel (1, 1, in, out), bias).
  """
  num_heads: int

  @nn.compact
  def __call__(self, attn):
    h = self.num_heads
    bound = 1 / math.sqrt(h)
    kernel = self.param("kernel", nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform"),
                        (1, 1, h, h), jnp.float32)
    bias = self.param("bias", _uniform(bound), (h,), jnp.float32)
    mixed = jnp.einsum("bhnm,hg->bgnm", attn, kernel[0, 0].astype(attn.dtype))
    return mixed + bias.astype(attn.dtype)[None, :, None, None]


def _split_heads(x, num_heads: int):
  """(B, H, W, heads*d) -> (B, H*W, heads, d) tokens; torch channel = head*d + j."""
  return rearrange(x, "b h w (heads d) -> b (h w) heads d", heads=num_heads)


def _merge_heads(tokens, height: int):
  """(B, H*W, heads, d) -> (B, H, W, heads*d): the inverse of :func:`_split_heads`."""
  return rearrange(tokens, "b (h w) heads d -> b h w (heads d)", h=height)


# ----------------------------------------------------------------------------
# Token mixers.
# ----------------------------------------------------------------------------

class Attention4D(nn.Module):
  """Multi-head attention on a feature map with talking heads and a local V branch.

  With ``stride=2`` (stage 2) attention runs on a stride-2 depthwise-conv copy of
  the input and the result is bilinearly upsampled back; the official code then
  needs even feature sizes.
  """
  num_heads: int = 8
  key_dim: int = 32
  attn_ratio: int = 4
  resolution: int = 16        # bias-table grid (after the stride)
  stride: int | None = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    _, height, width, dim = x.shape
    nh, kd = self.num_heads, self.key_dim
    d = self.attn_ratio * kd
    if self.stride not in (None, 2):
      raise ValueError(f"{self.name}: only stride 2 exists in EfficientFormerV2, got {self.stride}")
    if self.stride is not None:
      if height % 2 or width % 2:
        raise ValueError(
            f"{self.name}: strided attention needs an even feature size, got {height}x{width} "
            "(EfficientFormerV2 inputs must be multiples of 32)")
      x = _torch_conv(dim, 3, dim, stride=2, padding=1, groups=dim, dtype=self.dtype,
                      name="stride_conv.0")(x)
      x = layers.BatchNorm(dtype=self.dtype, name="stride_conv.1")(x, train)
    h, w = x.shape[1], x.shape[2]
    n = h * w

    def conv_bn(y, features, name, kernel_size=1, groups=1):
      y = _torch_conv(features, kernel_size, y.shape[-1], padding=kernel_size // 2,
                      groups=groups, dtype=self.dtype, name=f"{name}.0")(y)
      return layers.BatchNorm(dtype=self.dtype, name=f"{name}.1")(y, train)

    q = _split_heads(conv_bn(x, nh * kd, "q"), nh)
    k = _split_heads(conv_bn(x, nh * kd, "k"), nh)
    v_map = conv_bn(x, nh * d, "v")
    v_local = conv_bn(v_map, nh * d, "v_local", kernel_size=3, groups=nh * d)
    v = _split_heads(v_map, nh)

    attn = jnp.einsum("bnhd,bmhd->bhnm", q, k) * (kd ** -0.5)
    bias = _position_bias(self, nh, self.resolution, self.resolution, 1, n, n)
    attn = attn + bias.astype(attn.dtype)[None]
    attn = HeadMixer(nh, name="talking_head1")(attn)
    attn = jax.nn.softmax(attn.astype(jnp.float32), axis=-1).astype(self.dtype)
    attn = HeadMixer(nh, name="talking_head2")(attn)
    out = _merge_heads(jnp.einsum("bhnm,bmhd->bnhd", attn, v), h) + v_local
    if self.stride is not None:
      out = layers.resize_bilinear(out, (2 * h, 2 * w))
    out = _torch_conv(dim, 1, nh * d, dtype=self.dtype, name="proj.1")(layers.gelu(out))
    return layers.BatchNorm(dtype=self.dtype, name="proj.2")(out, train)


class Attention4DDownsample(nn.Module):
  """Stride-2 attention: queries on the subsampled grid, keys/values at full size.

  The query is ``LGQuery``: a stride-2 depthwise conv plus plain stride-2
  subsampling (the official 1x1 AvgPool), then a 1x1 conv + BN. No talking heads.
  """
  out_dim: int
  num_heads: int = 8
  key_dim: int = 16
  attn_ratio: int = 4
  resolution: int = 32        # key grid of the bias table; queries use ceil(/2)
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    _, height, width, dim = x.shape
    if height % 2 or width % 2:
      raise ValueError(
          f"{self.name}: downsampling attention needs an even feature size, got "
          f"{height}x{width} (EfficientFormerV2 inputs must be multiples of 32)")
    nh, kd = self.num_heads, self.key_dim
    d = self.attn_ratio * kd
    h, w = height // 2, width // 2

    def bn(y, name):
      return layers.BatchNorm(dtype=self.dtype, name=name)(y, train)

    local_q = _torch_conv(dim, 3, dim, stride=2, padding=1, groups=dim, dtype=self.dtype,
                          name="q.local.0")(x)
    q = local_q + x[:, ::2, ::2, :]
    q = bn(_torch_conv(nh * kd, 1, dim, dtype=self.dtype, name="q.proj.0")(q), "q.proj.1")
    k = bn(_torch_conv(nh * kd, 1, dim, dtype=self.dtype, name="k.0")(x), "k.1")
    v_map = bn(_torch_conv(nh * d, 1, dim, dtype=self.dtype, name="v.0")(x), "v.1")
    v_local = bn(_torch_conv(nh * d, 3, nh * d, stride=2, padding=1, groups=nh * d,
                             dtype=self.dtype, name="v_local.0")(v_map), "v_local.1")
    q, k, v = _split_heads(q, nh), _split_heads(k, nh), _split_heads(v_map, nh)

    attn = jnp.einsum("bnhd,bmhd->bhnm", q, k) * (kd ** -0.5)
    res2 = math.ceil(self.resolution / 2)
    bias = _position_bias(self, nh, res2, self.resolution, math.ceil(self.resolution / res2),
                          h * w, height * width)
    attn = attn + bias.astype(attn.dtype)[None]
    attn = jax.nn.softmax(attn.astype(jnp.float32), axis=-1).astype(self.dtype)
    out = _merge_heads(jnp.einsum("bhnm,bmhd->bnhd", attn, v), h) + v_local
    out = _torch_conv(self.out_dim, 1, nh * d, dtype=self.dtype, name="proj.1")(layers.gelu(out))
    return bn(out, "proj.2")


# ----------------------------------------------------------------------------
# Blocks.
# ----------------------------------------------------------------------------

class Mlp(nn.Module):
  """fc1 -> BN -> GELU -> depthwise 3x3 -> BN -> GELU -> fc2 -> BN (1x1 convs).

  The depthwise branch replaces its input (no residual), as in the official code.
  """
  hidden: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    dim = x.shape[-1]
    # fc1/fc2 get trunc-normal(0.02) in the official constructor; the mid conv
    # is created after that init pass and keeps torch's default.
    fc_init = nn.initializers.normal(0.02)
    x = layers.Conv2d(self.hidden, 1, dtype=self.dtype, kernel_init=fc_init, name="fc1")(x)
    x = layers.gelu(layers.BatchNorm(dtype=self.dtype, name="norm1")(x, train))
    x = _torch_conv(self.hidden, 3, self.hidden, padding=1, groups=self.hidden,
                    dtype=self.dtype, name="mid")(x)
    x = layers.gelu(layers.BatchNorm(dtype=self.dtype, name="mid_norm")(x, train))
    x = layers.Conv2d(dim, 1, dtype=self.dtype, kernel_init=fc_init, name="fc2")(x)
    return layers.BatchNorm(dtype=self.dtype, name="norm2")(x, train)


class Block(nn.Module):
  """FFN block (``attention=None``) or AttnFFN block, with layer scale and DropPath.

  AttnFFN: x += DropPath(ls1 * Attention4D(x)); then for both kinds
  x += DropPath(ls2 * Mlp(x)).
  """
  hidden: int
  drop_path: float = 0.0
  layer_scale_init: float = 1e-5
  attention: dict | None = None    # Attention4D fields for an AttnFFN block
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    dim = x.shape[-1]
    drop = layers.DropPath(self.drop_path)
    scale_init = nn.initializers.constant(self.layer_scale_init)
    if self.attention is not None:
      ls1 = self.param("layer_scale_1", scale_init, (dim,), jnp.float32)
      mixed = Attention4D(**self.attention, dtype=self.dtype, name="token_mixer")(x, train)
      x = x + drop(mixed * ls1.astype(mixed.dtype), train)
    ls2 = self.param("layer_scale_2", scale_init, (dim,), jnp.float32)
    y = Mlp(self.hidden, dtype=self.dtype, name="mlp")(x, train)
    return x + drop(y * ls2.astype(y.dtype), train)


class Embedding(nn.Module):
  """Downsampling between stages: conv 3x3 s2 + BN, or (``attention``) that plus
  ``Attention4DDownsample`` (the official ``asub`` embedding)."""
  out_dim: int
  attention: dict | None = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    dim = x.shape[-1]
    if self.attention is None:
      x = _torch_conv(self.out_dim, 3, dim, stride=2, padding=1, dtype=self.dtype, name="proj")(x)
      return layers.BatchNorm(dtype=self.dtype, name="norm")(x, train)
    y = _torch_conv(self.out_dim, 3, dim, stride=2, padding=1, dtype=self.dtype, name="conv")(x)
    y = layers.BatchNorm(dtype=self.dtype, name="bn")(y, train)
    attn = Attention4DDownsample(self.out_dim, **self.attention, dtype=self.dtype, name="attn")
    return attn(x, train) + y


# ----------------------------------------------------------------------------
# The backbone.
# ----------------------------------------------------------------------------

class EfficientFormerV2(nn.Module):
  """EfficientFormerV2 feature extractor; returns the 4 stage maps (NHWC, strides 4..32).

  Attributes:
    widths: channels of the 4 stages.
    depths: blocks per stage.
    expansion_ratios: per stage, one MLP expansion ratio per block
      (hidden = int(width * ratio)).
    vit_num: the last ``vit_num`` blocks of stages 2 and 3 are AttnFFN blocks.
    resolution: the crop size the position-bias tables are made for (512 in all
      official configs); other inputs resize the biases bicubically.
    drop_path_rate: stochastic depth grows linearly over all blocks to this rate.
    num_heads, key_dim, attn_ratio: Attention4D sizes (value dim = ratio*key_dim);
      ``downsample_key_dim`` is the key dim of the stage-2 -> 3 attention.
    layer_scale_init: initial layer-scale value.

  Inputs must have H and W divisible by 32 (strided and downsampling attention
  reshape with H // 2 at stride 16), as in the official code.
  """
  # Read by offseg_jax.models.construction.size_divisor: inference pads to it.
  size_divisor: ClassVar[int] = 32
  widths: Sequence[int] = WIDTHS["S1"]
  depths: Sequence[int] = DEPTHS["S1"]
  expansion_ratios: Sequence[Sequence[float]] = EXPANSION_RATIOS["S1"]
  vit_num: int = VIT_NUM["S1"]
  resolution: int = 512
  drop_path_rate: float = DROP_PATH_RATE["S1"]
  num_heads: int = 8
  key_dim: int = 32
  attn_ratio: int = 4
  downsample_key_dim: int = 16
  layer_scale_init: float = 1e-5
  dtype: Dtype = jnp.float32

  def _check(self):
    if len(self.widths) != 4 or len(self.depths) != 4 or len(self.expansion_ratios) != 4:
      raise ValueError("EfficientFormerV2 has exactly 4 stages: widths, depths and "
                       "expansion_ratios need 4 entries each")
    for s, (depth, ratios) in enumerate(zip(self.depths, self.expansion_ratios)):
      if len(ratios) != depth:
        raise ValueError(f"stage {s}: {len(ratios)} expansion ratios for {depth} blocks")

  @nn.compact
  def __call__(self, images, train: bool = False):
    self._check()
    x = images.astype(self.dtype)
    c0 = self.widths[0]
    x = _torch_conv(c0 // 2, 3, x.shape[-1], stride=2, padding=1, dtype=self.dtype,
                    name="patch_embed.0")(x)
    x = layers.gelu(layers.BatchNorm(dtype=self.dtype, name="patch_embed.1")(x, train))
    x = _torch_conv(c0, 3, c0 // 2, stride=2, padding=1, dtype=self.dtype,
                    name="patch_embed.3")(x)
    x = layers.gelu(layers.BatchNorm(dtype=self.dtype, name="patch_embed.4")(x, train))

    total = sum(self.depths)
    outs = []
    block_index = 0
    for s in range(4):
      stage_res = math.ceil(self.resolution / 2 ** (s + 2))
      for j in range(self.depths[s]):
        attention = None
        if s >= 2 and j > self.depths[s] - 1 - self.vit_num:
          stride = 2 if s == 2 else None
          attention = dict(num_heads=self.num_heads, key_dim=self.key_dim,
                           attn_ratio=self.attn_ratio, stride=stride,
                           resolution=math.ceil(stage_res / (stride or 1)))
        rate = self.drop_path_rate * block_index / max(total - 1, 1)
        x = Block(int(self.widths[s] * self.expansion_ratios[s][j]), drop_path=rate,
                  layer_scale_init=self.layer_scale_init, attention=attention,
                  dtype=self.dtype, name=f"network.{2 * s}.{j}")(x, train)
        block_index += 1
      outs.append(x)
      if s < 3:
        attention = None
        if s >= 2:
          attention = dict(num_heads=self.num_heads, key_dim=self.downsample_key_dim,
                           attn_ratio=self.attn_ratio, resolution=stage_res)
        x = Embedding(self.widths[s + 1], attention=attention, dtype=self.dtype,
                      name=f"network.{2 * s + 1}")(x, train)
    return tuple(outs)


# The official segmentation backbones (``efficientformerv2_{s1,s2,l}_feat``).
register_backbones(
    EfficientFormerV2,
    {name: dict(widths=WIDTHS[v], depths=DEPTHS[v], expansion_ratios=EXPANSION_RATIOS[v],
                vit_num=VIT_NUM[v], drop_path_rate=DROP_PATH_RATE[v])
     for v, name in (("S1", "efficientformerv2_s1_feat"), ("S2", "efficientformerv2_s2_feat"),
                     ("L", "efficientformerv2_l_feat"))},
    doc=lambda name: (f"EfficientFormerV2-{name.split('_')[1].upper()} segmentation backbone; "
                      "keyword overrides replace EfficientFormerV2 fields."))
