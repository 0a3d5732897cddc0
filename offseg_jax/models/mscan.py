"""MSCAN, the SegNeXt backbone (multi-scale convolutional attention), in NHWC.

Stage 1 embeds with two stride-2 3x3 convs (``patch_embed1.proj.{0,1,3,4}``),
stages 2-4 with one stride-2 3x3 conv + BN (``patch_embed{k}.proj/norm``). A block
is ``x + DropPath(ls1 * SA(BN x))`` then ``x + DropPath(ls2 * Mlp(BN x))``, where
the spatial attention SA gates a 1x1-projected, GELU-activated input with the sum
of a 5x5 depthwise conv and three strip-conv branches (1x7/7x1, 1x11/11x1,
1x21/21x1), and Mlp is SegFormer's Mix-FFN (``mit.MixFFN``). Each stage ends in a
LayerNorm (eps 1e-5); all four stages are output.

BatchNorm: mmseg's SegNeXt configs use plain (unsynced) BN, so in training each
GPU normalises over its own 2 images. This port's ``BatchNorm`` normalises over
the whole batch it is given (under ``jax.jit`` with a sharded batch: the global
batch, i.e. SyncBN behaviour). Per-GPU statistics would need ghost batches,
which are not implemented; evaluation (running statistics) is unaffected.
"""

from __future__ import annotations

from typing import Any, ClassVar, Sequence

import flax.linen as nn
import jax.numpy as jnp

from offseg_jax.models import layers
from offseg_jax.models.family import backbone_fields_from_official, register_backbones
from offseg_jax.models.van import SpatialAttention, VANBlock

MSCAN_SIZES = {
    "t": dict(embed_dims=(32, 64, 160, 256), depths=(3, 3, 5, 2)),
    "s": dict(embed_dims=(64, 128, 320, 512), depths=(2, 2, 4, 2)),
    "b": dict(embed_dims=(64, 128, 320, 512), depths=(3, 3, 12, 3)),
}
# Every SegNeXt config uses MLP ratios (8, 8, 4, 4) and stochastic depth 0.1.
for _fields in MSCAN_SIZES.values():
  _fields.update(mlp_ratios=(8, 8, 4, 4), drop_path_rate=0.1)

_DEFAULT_KERNELS = (5, (1, 7), (1, 11), (1, 21))
_DEFAULT_PADDINGS = (2, (0, 3), (0, 5), (0, 10))


def _flip(pair):
  """(a, b) -> (b, a): the second conv of a strip branch is the transposed strip."""
  return (pair[1], pair[0])


class MSCAAttention(nn.Module):
  """Multi-scale conv attention: conv3(a + sum of strip branches(a)) * u, a = DW5x5(u)."""
  kernel_sizes: Sequence[Any] = _DEFAULT_KERNELS
  paddings: Sequence[Any] = _DEFAULT_PADDINGS
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, u):
    c = u.shape[-1]
    conv = lambda kernel, pad, name: layers.fan_out_conv(c, kernel, pad, groups=c,
                                                         dtype=self.dtype, name=name)
    attn = conv(self.kernel_sizes[0], self.paddings[0], "conv0")(u)
    total = attn
    for i, (kernel, pad) in enumerate(zip(self.kernel_sizes[1:], self.paddings[1:])):
      branch = conv(tuple(kernel), tuple(pad), f"conv{i}_1")(attn)
      branch = conv(_flip(kernel), _flip(pad), f"conv{i}_2")(branch)
      total = total + branch
    return layers.fan_out_conv(c, 1, dtype=self.dtype, name="conv3")(total) * u


class MSCASpatialAttention(SpatialAttention):
  """VAN's spatial attention with :class:`MSCAAttention` as its gating unit."""
  kernel_sizes: Sequence[Any] = _DEFAULT_KERNELS
  paddings: Sequence[Any] = _DEFAULT_PADDINGS

  @nn.nowrap
  def gating_unit(self) -> nn.Module:
    return MSCAAttention(self.kernel_sizes, self.paddings, dtype=self.dtype,
                         name="spatial_gating_unit")


class MSCABlock(VANBlock):
  """VAN's block (BN pre-norm, layer scales 1e-2) with multi-scale conv attention.

  The Mix-FFN's depthwise conv is ``mlp.dwconv`` here (VAN: ``mlp.dwconv.dwconv``).
  """
  kernel_sizes: Sequence[Any] = _DEFAULT_KERNELS
  paddings: Sequence[Any] = _DEFAULT_PADDINGS

  mlp_names: ClassVar[tuple[str, str, str]] = ("fc1", "dwconv", "fc2")

  @nn.nowrap
  def mixer(self, x, train):
    return MSCASpatialAttention(kernel_sizes=self.kernel_sizes, paddings=self.paddings,
                                dtype=self.dtype, name="attn")(x)


class StemConv(nn.Module):
  """conv3x3 s2 -> BN -> GELU -> conv3x3 s2 -> BN (torch ``proj.{0,1,3,4}``)."""
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = layers.fan_out_conv(self.features // 2, 3, 1, 2, dtype=self.dtype, name="proj.0")(x)
    x = layers.gelu(layers.BatchNorm(dtype=self.dtype, name="proj.1")(x, train))
    x = layers.fan_out_conv(self.features, 3, 1, 2, dtype=self.dtype, name="proj.3")(x)
    return layers.BatchNorm(dtype=self.dtype, name="proj.4")(x, train)


class OverlapPatchEmbed(nn.Module):
  """conv3x3 s2 p1 -> BN (torch ``proj`` / ``norm``), stages 2-4."""
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = layers.fan_out_conv(self.features, 3, 1, 2, dtype=self.dtype, name="proj")(x)
    return layers.BatchNorm(dtype=self.dtype, name="norm")(x, train)


class MSCAN(nn.Module):
  """MSCAN backbone: NHWC image -> tuple of 4 NHWC maps at strides 4, 8, 16, 32.

  Attributes mirror mmseg's ``MSCAN`` constructor (defaults included).
  Stochastic depth grows linearly from 0 to ``drop_path_rate`` over all blocks.
  """
  embed_dims: Sequence[int] = (64, 128, 256, 512)
  mlp_ratios: Sequence[float] = (4, 4, 4, 4)
  depths: Sequence[int] = (3, 4, 6, 3)
  attention_kernel_sizes: Sequence[Any] = _DEFAULT_KERNELS
  attention_kernel_paddings: Sequence[Any] = _DEFAULT_PADDINGS
  drop_rate: float = 0.0
  drop_path_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images, train: bool = False):
    if not len(self.embed_dims) == len(self.mlp_ratios) == len(self.depths):
      raise ValueError("embed_dims, mlp_ratios and depths need one entry per stage")
    x, outs = images, []
    rates = layers.drop_path_rates(self.depths, self.drop_path_rate)
    for i, width in enumerate(self.embed_dims):
      if i == 0:
        x = StemConv(width, dtype=self.dtype, name="patch_embed1")(x, train)
      else:
        x = OverlapPatchEmbed(width, dtype=self.dtype, name=f"patch_embed{i + 1}")(x, train)
      for j, rate in enumerate(rates[i]):
        x = MSCABlock(mlp_ratio=self.mlp_ratios[i], kernel_sizes=self.attention_kernel_sizes,
                      paddings=self.attention_kernel_paddings, drop_rate=self.drop_rate,
                      drop_path_rate=rate, dtype=self.dtype,
                      name=f"block{i + 1}.{j}")(x, train)
      x = layers.LayerNorm(1e-5, dtype=self.dtype, name=f"norm{i + 1}")(x)
      outs.append(x)
    return tuple(outs)


def mscan_config_from_official(cfg: dict) -> dict:
  """Maps an mmseg ``MSCAN`` config onto our constructor fields."""
  if cfg.get("num_stages", 4) != 4:
    raise ValueError("MSCAN always has 4 stages here")
  return backbone_fields_from_official(
      cfg, "MSCAN",
      ("embed_dims", "mlp_ratios", "depths", "attention_kernel_sizes",
       "attention_kernel_paddings", "drop_rate", "drop_path_rate"),
      norm_default={"type": "SyncBN"}, norm_ok=lambda norm: norm.get("type") in ("BN", "SyncBN"),
      norm_support="BN / SyncBN only")


register_backbones(
    MSCAN, {f"mscan_{size}": fields for size, fields in MSCAN_SIZES.items()}, family="mscan",
    doc=lambda name: f"MSCAN-{name[6:].upper()} (SegNeXt-{name[6:].upper()} backbone).")
