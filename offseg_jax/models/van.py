"""VAN (Visual Attention Network, large-kernel attention), segmentation form, in NHWC.

Each stage embeds with an overlapping patch conv + BatchNorm (7x7 stride 4 for the
first stage, 3x3 stride 2 after), runs ``depths[i]`` blocks and ends in a
LayerNorm over channels; every stage output is returned (strides 4, 8, 16, 32) and
the next stage embeds the normalised map.

A block is::

  x = x + DropPath(ls1 * Attn(BN1 x))        Attn(u) = proj_2(LKA(GELU(proj_1 u))) + u
  x = x + DropPath(ls2 * Mlp(BN2 x))         Mlp = fc1 1x1 -> dw 3x3 -> GELU -> fc2 1x1

with the large-kernel attention ``LKA(a) = a * conv1(dw7x7_dil3(dw5x5(a)))`` and
per-channel layer scales ``ls1``/``ls2`` (init 1e-2). GELU is the exact erf form.

Names follow VAN-Segmentation (the parity fixture) and VAN-Classification, which
share every key but the classifier ``head.*``: ``patch_embed{i}.proj/norm``,
``block{i}.{j}.norm1/attn.proj_1/attn.spatial_gating_unit.{conv0,conv_spatial,
conv1}/attn.proj_2/norm2/mlp.fc1/mlp.dwconv.dwconv/mlp.fc2/layer_scale_{1,2}``,
``norm{i}``. mmseg's ``projects/van`` port names the MLP's depthwise conv
``mlp.dwconv`` instead; ``offseg_jax.conversion.van_names`` rewrites such keys
(and drops the ImageNet head) before conversion.

LayerNorm eps: 1e-5 (``nn.LayerNorm``'s default, as in VAN-Segmentation and mmseg);
the ImageNet classification models use 1e-6 with the same weights. Fine-tuning
from an ImageNet checkpoint with 1e-5 is what both official segmentation codes do;
``norm_eps=1e-6`` reproduces the classification features exactly.

BatchNorm is SyncBN in the official segmentation configs; ours normalises over the
global batch under ``jax.jit`` (see ``layers.BatchNorm``), the same thing.
"""

from __future__ import annotations

from typing import Any, ClassVar, Mapping, Sequence

import flax.linen as nn
import jax.numpy as jnp

from offseg_jax.models import layers
from offseg_jax.models.family import as_field, backbone_from_official, register_backbones
from offseg_jax.models.mit import MixFFN

# Published VAN sizes (VAN-Classification / VAN-Segmentation); every size uses MLP
# ratios (8, 8, 4, 4). Stochastic depth: the mmseg / VAN-Segmentation Semantic-FPN
# configs use 0.2 for B0-B2 and 0.3 for B3 (the value a fine-tuning run starts from).
VAN_SIZES = {
    "b0": dict(embed_dims=(32, 64, 160, 256), depths=(3, 3, 5, 2), drop_path_rate=0.2),
    "b1": dict(embed_dims=(64, 128, 320, 512), depths=(2, 2, 4, 2), drop_path_rate=0.2),
    "b2": dict(embed_dims=(64, 128, 320, 512), depths=(3, 3, 12, 3), drop_path_rate=0.2),
    "b3": dict(embed_dims=(64, 128, 320, 512), depths=(3, 5, 27, 3), drop_path_rate=0.3),
}
for _fields in VAN_SIZES.values():
  _fields["mlp_ratios"] = (8, 8, 4, 4)


class LKA(nn.Module):
  """Large-kernel attention (torch ``AttentionModule``): ``a * conv1(dw7x7_d3(dw5x5(a)))``.

  The 5x5 depthwise conv (padding 2) and the 7x7 depthwise conv with dilation 3
  (padding 9) keep the size and together see a 21x21 neighbourhood; the 1x1 conv
  mixes channels; the result gates the input elementwise.
  """
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, a):
    c = a.shape[-1]
    attn = layers.fan_out_conv(c, 5, 2, groups=c, dtype=self.dtype, name="conv0")(a)
    attn = layers.fan_out_conv(c, 7, 9, dilation=3, groups=c, dtype=self.dtype,
                               name="conv_spatial")(attn)
    attn = layers.fan_out_conv(c, 1, dtype=self.dtype, name="conv1")(attn)
    return a.astype(self.dtype) * attn


class SpatialAttention(nn.Module):
  """``proj_2(gate(GELU(proj_1 x))) + x``: a residual onto the (normalised) input.

  The gating unit (torch ``spatial_gating_unit``) is :class:`LKA`; SegNeXt's
  MSCAN swaps in its multi-scale conv attention (:meth:`gating_unit`).
  """
  dtype: Any = jnp.float32

  @nn.nowrap
  def gating_unit(self) -> nn.Module:
    return LKA(dtype=self.dtype, name="spatial_gating_unit")

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    y = layers.gelu(layers.fan_out_conv(c, 1, dtype=self.dtype, name="proj_1")(x))
    y = self.gating_unit()(y)
    return layers.fan_out_conv(c, 1, dtype=self.dtype, name="proj_2")(y) + x.astype(self.dtype)


class VANBlock(layers.PreNormResidual):
  """BN pre-norm block: attention then MLP, each layer-scaled (init 1e-2) and drop-pathed.

  The MLP is SegFormer's Mix-FFN (fc1 1x1 -> depthwise 3x3 -> GELU -> fc2 1x1,
  dropout after the GELU and fc2) with VAN's names (``mlp_names``).
  """
  drop_rate: float = 0.0

  layer_scale_init: ClassVar[float] = 1e-2
  # The official DWConv wrapper holds the conv as ``dwconv``: ``mlp.dwconv.dwconv.weight``.
  mlp_names: ClassVar[tuple[str, str, str]] = ("fc1", "dwconv.dwconv", "fc2")

  @nn.nowrap
  def pre_norm(self, x, name, train):
    return layers.BatchNorm(dtype=self.dtype, name=name)(x, train)

  @nn.nowrap
  def mixer(self, x, train):
    return SpatialAttention(dtype=self.dtype, name="attn")(x)

  @nn.nowrap
  def mlp(self, x, train):
    return MixFFN(int(x.shape[-1] * self.mlp_ratio), self.drop_rate, names=self.mlp_names,
                  dtype=self.dtype, name="mlp")(x, train)


class OverlapPatchEmbed(nn.Module):
  """Conv (k, stride s, padding k // 2, with bias) -> BatchNorm: torch ``proj`` / ``norm``."""
  features: int
  patch_size: int = 7
  stride: int = 4
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = layers.fan_out_conv(self.features, self.patch_size, self.patch_size // 2, self.stride,
                            dtype=self.dtype, name="proj")(x)
    return layers.BatchNorm(dtype=self.dtype, name="norm")(x, train)


class VAN(nn.Module):
  """VAN backbone: NHWC image -> tuple of NHWC maps, one per stage (strides 4, 8, 16, 32).

  Attributes mirror the official ``VAN`` constructor (mmseg defaults):
    embed_dims: width of each stage.
    mlp_ratios: MLP expansion of each stage.
    depths: blocks per stage.
    drop_rate: dropout inside the MLPs (training only).
    drop_path_rate: stochastic depth, rising linearly from 0 over all blocks.
    norm_eps: eps of the per-stage LayerNorms (1e-5 segmentation, 1e-6 classification).
    dtype: computation dtype (parameters stay float32).
  """
  embed_dims: Sequence[int] = (64, 128, 256, 512)
  mlp_ratios: Sequence[float] = (8, 8, 4, 4)
  depths: Sequence[int] = (3, 4, 6, 3)
  drop_rate: float = 0.0
  drop_path_rate: float = 0.0
  norm_eps: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images, train: bool = False):
    if not len(self.embed_dims) == len(self.mlp_ratios) == len(self.depths):
      raise ValueError("embed_dims, mlp_ratios and depths need one entry per stage; got "
                       f"{self.embed_dims}, {self.mlp_ratios}, {self.depths}")
    x, outs = images, []
    rates = layers.drop_path_rates(self.depths, self.drop_path_rate)
    for i, width in enumerate(self.embed_dims):
      x = OverlapPatchEmbed(width, 7 if i == 0 else 3, 4 if i == 0 else 2, dtype=self.dtype,
                            name=f"patch_embed{i + 1}")(x, train)
      for j, rate in enumerate(rates[i]):
        x = VANBlock(mlp_ratio=self.mlp_ratios[i], drop_rate=self.drop_rate,
                     drop_path_rate=rate, dtype=self.dtype, name=f"block{i + 1}.{j}")(x, train)
      x = layers.LayerNorm(self.norm_eps, dtype=self.dtype, name=f"norm{i + 1}")(x)
      outs.append(x)
    return tuple(outs)


# Official constructor options that carry no architecture for us: weight loading
# (done by the converter), and the classification model's input size / classes
# (its head is not part of the backbone).
_IGNORED_OPTIONS = ("type", "pretrained", "init_cfg", "img_size", "num_classes")
_MAPPED_OPTIONS = ("embed_dims", "mlp_ratios", "depths", "drop_rate", "drop_path_rate")


def van_config_from_official(cfg: Mapping[str, Any]) -> dict:
  """Maps an official ``VAN`` config (VAN-Segmentation or mmseg) onto our fields.

  Raises ``ValueError`` naming the first option we do not port (e.g. ``linear=True``,
  a non-BN ``norm_cfg``, a non-GELU ``act_cfg``, an unknown key).
  """
  if cfg.get("type", "VAN") != "VAN":
    raise ValueError(f"Not a VAN config: type {cfg.get('type')!r}")
  known = set(_IGNORED_OPTIONS) | set(_MAPPED_OPTIONS) | {
      "in_channels", "in_chans", "num_stages", "norm_cfg", "act_cfg", "linear"}
  unknown = sorted(set(cfg) - known)
  if unknown:
    raise ValueError(f"VAN option {unknown[0]!r} is not supported by this port")
  for key in ("in_channels", "in_chans"):
    if cfg.get(key, 3) != 3:
      raise ValueError(f"VAN {key}={cfg[key]} is not supported (RGB input only)")
  if cfg.get("linear", False):
    raise ValueError("VAN linear=True (ReLU in the MLP) is not supported")
  norm = cfg.get("norm_cfg") or {"type": "SyncBN"}
  if norm.get("type") not in ("BN", "SyncBN"):
    raise ValueError(f"VAN norm_cfg {dict(norm)} is not supported (BN / SyncBN only)")
  act = cfg.get("act_cfg") or {"type": "GELU"}
  if act.get("type") != "GELU" or act.get("approximate", "none") != "none":
    raise ValueError(f"VAN act_cfg {dict(act)} is not supported (exact GELU only)")
  fields = as_field({k: cfg[k] for k in _MAPPED_OPTIONS if k in cfg})
  stages = len(fields.get("embed_dims", VAN.embed_dims))
  if cfg.get("num_stages", stages) != stages:
    raise ValueError(f"VAN num_stages={cfg['num_stages']} does not match {stages} embed_dims")
  return fields


van_from_official = backbone_from_official(VAN, van_config_from_official)


def _size_doc(name: str) -> str:
  fields = VAN_SIZES[name[len("van_"):]]
  return (f"VAN-{name[len('van_'):].upper()}: dims {fields['embed_dims']}, depths "
          f"{fields['depths']}, MLP ratios (8, 8, 4, 4).")


register_backbones(VAN, {f"van_{size}": fields for size, fields in VAN_SIZES.items()},
                   family="van", from_official=van_from_official, doc=_size_doc)
