"""Mix Vision Transformer (MiT), the SegFormer backbone, in NHWC.

Four stages, each: an overlapping patch embedding (strided conv + LayerNorm),
blocks of efficient self-attention (keys/values spatially reduced by a strided
conv) and Mix-FFN (1x1 conv, depthwise 3x3 conv, GELU, 1x1 conv), then a stage
LayerNorm. All LayerNorms use eps 1e-6, as mmseg's MiT does.

Submodules carry mmseg's names (``layers.{i}.0.projection``, ``layers.{i}.1.{j}
.attn.attn.in_proj_weight``...), so an official checkpoint converts by name.
"""

from __future__ import annotations

from typing import Any, Sequence

from einops import rearrange
import flax.linen as nn
import jax
import jax.numpy as jnp

from offseg_jax.models import layers
from offseg_jax.models.family import backbone_fields_from_official, register_backbones

_LN_EPS = 1e-6
_trunc02 = nn.initializers.truncated_normal(stddev=0.02)


# SegFormer sizes. Stage widths are embed_dims * num_heads[i]; every size uses
# heads (1, 2, 5, 8) and the configs' stochastic depth 0.1.
MIT_SIZES = {
    size: dict(embed_dims=dims, num_layers=depths, num_heads=(1, 2, 5, 8),
               drop_path_rate=0.1)
    for size, dims, depths in (
        ("b0", 32, (2, 2, 2, 2)),
        ("b1", 64, (2, 2, 2, 2)),
        ("b2", 64, (3, 4, 6, 3)),
        ("b3", 64, (3, 4, 18, 3)),
        ("b4", 64, (3, 8, 27, 3)),
        ("b5", 64, (3, 6, 40, 3)),
    )
}


class TorchMultiheadAttention(nn.Module):
  """torch.nn.MultiheadAttention (batch first, no masks) on (B, N, C) tokens.

  The packed projection stays in torch layout, ``in_proj_weight`` (3C, C) and
  ``in_proj_bias`` (3C,): rows [0:C] project queries, [C:2C] keys, [2C:3C]
  values; heads take contiguous channel slices (channel = head * d + j).
  """
  num_heads: int
  attn_drop_rate: float = 0.0
  use_bias: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, query, key_value, train: bool = False):
    c = query.shape[-1]
    h = self.num_heads
    if c % h:
      raise ValueError(f"{self.name}: {c} channels not divisible into {h} heads")
    d = c // h
    w_in = self.param("in_proj_weight", nn.initializers.xavier_uniform(), (3 * c, c),
                      jnp.float32).astype(self.dtype)
    q = query.astype(self.dtype) @ w_in[:c].T
    k = key_value.astype(self.dtype) @ w_in[c:2 * c].T
    v = key_value.astype(self.dtype) @ w_in[2 * c:].T
    if self.use_bias:
      b_in = self.param("in_proj_bias", nn.initializers.zeros, (3 * c,),
                        jnp.float32).astype(self.dtype)
      q, k, v = q + b_in[:c], k + b_in[c:2 * c], v + b_in[2 * c:]
    q, k, v = (rearrange(t, "b n (heads d) -> b n heads d", heads=h) for t in (q, k, v))
    logits = jnp.einsum("bnhd,bmhd->bhnm", q * (d ** -0.5), k)
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(self.dtype)
    if train and self.attn_drop_rate > 0:
      weights = nn.Dropout(self.attn_drop_rate, deterministic=False)(weights)
    out = rearrange(jnp.einsum("bhnm,bmhd->bnhd", weights, v), "b n heads d -> b n (heads d)")
    return layers.Linear(c, dtype=self.dtype, kernel_init=_trunc02, name="out_proj")(out)


class EfficientMultiheadAttention(nn.Module):
  """SegFormer's spatial-reduction attention on an NHWC map (already normalised).

  With ``sr_ratio > 1`` the keys/values come from a (sr x sr, stride sr) conv of
  the map followed by a LayerNorm; the queries keep full resolution.
  """
  num_heads: int
  sr_ratio: int = 1
  attn_drop_rate: float = 0.0
  qkv_bias: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    c = x.shape[-1]
    kv = x
    if self.sr_ratio > 1:
      kv = layers.fan_out_conv(c, self.sr_ratio, stride=self.sr_ratio, dtype=self.dtype,
                               name="sr")(x)
      kv = layers.LayerNorm(_LN_EPS, dtype=self.dtype, name="norm")(kv)
    out = TorchMultiheadAttention(self.num_heads, self.attn_drop_rate, self.qkv_bias,
                                  dtype=self.dtype, name="attn")(
        rearrange(x, "b h w c -> b (h w) c"), rearrange(kv, "b h w c -> b (h w) c"), train)
    return rearrange(out, "b (h w) c -> b h w c", h=x.shape[1])


class MixFFN(nn.Module):
  """1x1 conv -> depthwise 3x3 conv -> GELU -> 1x1 conv, dropout after GELU and fc2.

  ``names`` are the three convs' torch names: mmseg MiT's ``layers.{0,1,4}``
  by default; SegNeXt's MSCAN reuses this FFN as ``fc1``/``dwconv``/``fc2``.
  """
  hidden: int
  drop_rate: float = 0.0
  names: Sequence[str] = ("layers.0", "layers.1", "layers.4")
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    c = x.shape[-1]
    fc1, dwconv, fc2 = self.names
    y = layers.fan_out_conv(self.hidden, 1, dtype=self.dtype, name=fc1)(x)
    y = layers.fan_out_conv(self.hidden, 3, 1, groups=self.hidden, dtype=self.dtype,
                            name=dwconv)(y)
    y = layers.gelu(y)
    if train and self.drop_rate > 0:
      y = nn.Dropout(self.drop_rate, deterministic=False)(y)
    y = layers.fan_out_conv(c, 1, dtype=self.dtype, name=fc2)(y)
    if train and self.drop_rate > 0:
      y = nn.Dropout(self.drop_rate, deterministic=False)(y)
    return y


class MiTBlock(layers.PreNormResidual, kw_only=True):
  """Pre-norm transformer block: x + DropPath(attn(LN x)); x + DropPath(ffn(LN x))."""
  num_heads: int
  sr_ratio: int
  qkv_bias: bool = True
  drop_rate: float = 0.0
  attn_drop_rate: float = 0.0

  @nn.nowrap
  def pre_norm(self, x, name, train):
    return layers.LayerNorm(_LN_EPS, dtype=self.dtype, name=name)(x)

  @nn.nowrap
  def mixer(self, x, train):
    y = EfficientMultiheadAttention(self.num_heads, self.sr_ratio, self.attn_drop_rate,
                                    self.qkv_bias, dtype=self.dtype, name="attn")(x, train)
    if train and self.drop_rate > 0:      # mmcv's proj_drop after out_proj
      y = nn.Dropout(self.drop_rate, deterministic=False)(y)
    return y

  @nn.nowrap
  def mlp(self, x, train):
    return MixFFN(int(self.mlp_ratio * x.shape[-1]), self.drop_rate, dtype=self.dtype,
                  name="ffn")(x, train)


class PatchEmbed(nn.Module):
  """Overlapping patch embedding: conv (k, stride s, pad k//2) then LayerNorm."""
  features: int
  kernel_size: int
  stride: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = layers.fan_out_conv(self.features, self.kernel_size, self.kernel_size // 2, self.stride,
                            dtype=self.dtype, name="projection")(x)
    return layers.LayerNorm(_LN_EPS, dtype=self.dtype, name="norm")(x)


class MixVisionTransformer(nn.Module):
  """MiT backbone: NHWC image -> tuple of NHWC maps at strides 4, 8, 16, 32.

  Attributes mirror mmseg's ``MixVisionTransformer`` constructor. Stage i has
  ``embed_dims * num_heads[i]`` channels. Stochastic depth grows linearly from
  0 to ``drop_path_rate`` over all blocks (rng stream ``'dropout'``).
  """
  embed_dims: int = 64
  num_layers: Sequence[int] = (3, 4, 6, 3)
  num_heads: Sequence[int] = (1, 2, 4, 8)
  patch_sizes: Sequence[int] = (7, 3, 3, 3)
  strides: Sequence[int] = (4, 2, 2, 2)
  sr_ratios: Sequence[int] = (8, 4, 2, 1)
  out_indices: Sequence[int] = (0, 1, 2, 3)
  mlp_ratio: int = 4
  qkv_bias: bool = True
  drop_rate: float = 0.0
  attn_drop_rate: float = 0.0
  drop_path_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images, train: bool = False):
    n_stages = len(self.num_layers)
    if not (n_stages == len(self.num_heads) == len(self.patch_sizes) == len(self.strides)
            == len(self.sr_ratios)):
      raise ValueError("num_layers, num_heads, patch_sizes, strides and sr_ratios must "
                       "have one entry per stage")
    x, outs = images, []
    for i, rates in enumerate(layers.drop_path_rates(self.num_layers, self.drop_path_rate)):
      width = self.embed_dims * self.num_heads[i]
      x = PatchEmbed(width, self.patch_sizes[i], self.strides[i], dtype=self.dtype,
                     name=f"layers.{i}.0")(x)
      for j, rate in enumerate(rates):
        x = MiTBlock(num_heads=self.num_heads[i], sr_ratio=self.sr_ratios[i],
                     mlp_ratio=self.mlp_ratio, qkv_bias=self.qkv_bias, drop_rate=self.drop_rate,
                     attn_drop_rate=self.attn_drop_rate, drop_path_rate=rate, dtype=self.dtype,
                     name=f"layers.{i}.1.{j}")(x, train)
      x = layers.LayerNorm(_LN_EPS, dtype=self.dtype, name=f"layers.{i}.2")(x)
      if i in self.out_indices:
        outs.append(x)
    return tuple(outs)


def mit_config_from_official(cfg: dict) -> dict:
  """Maps an mmseg ``MixVisionTransformer`` config onto our constructor fields."""
  out = backbone_fields_from_official(
      cfg, "MixVisionTransformer",
      ("embed_dims", "num_layers", "num_heads", "patch_sizes", "strides", "sr_ratios",
       "out_indices", "mlp_ratio", "qkv_bias", "drop_rate", "attn_drop_rate",
       "drop_path_rate"),
      norm_default={"type": "LN", "eps": 1e-6},
      norm_ok=lambda norm: norm.get("type") == "LN" and norm.get("eps", 1e-5) == _LN_EPS,
      norm_support="LayerNorm eps 1e-6 only")
  if "num_stages" in cfg and cfg["num_stages"] != len(out.get("num_layers", (0,) * 4)):
    raise ValueError("num_stages does not match num_layers")
  return out


register_backbones(
    MixVisionTransformer, {f"mit_{size}": fields for size, fields in MIT_SIZES.items()},
    family="mit",
    doc=lambda name: f"MiT-{name[4:].upper()} (SegFormer-{name[4:].upper()} backbone).")
