"""ResNetV1c backbone (mmseg's ``ResNetV1c``), in NHWC.

ResNetV1c is ResNet with the "deep stem" of Bag of Tricks (He et al. 2019):

  stem:   conv3x3/2 (3 -> stem/2), BN, ReLU, conv3x3 (stem/2 -> stem/2), BN, ReLU,
          conv3x3 (stem/2 -> stem), BN, ReLU; then max pool 3x3/2 (padding 1)
  layerN: residual blocks (Bottleneck for depth 50/101/152, BasicBlock for 18/34),
          width ``base_channels * 2**i`` (x4 for Bottleneck outputs)

Segmentation configs choose ``strides``/``dilations`` per stage: "d32" keeps
strides 1-2-2-2 (output strides 4/8/16/32); "d8" uses strides 1-2-1-1 with
dilations 1-1-2-4 (4/8/8/8). With ``contract_dilation`` the first block of a
dilated stage uses half the dilation (it is the one that would have
downsampled). ``multi_grid`` sets the per-block dilations of the last stage.

Bottleneck "pytorch" style puts the stride on the 3x3 conv, "caffe" style on the
first 1x1. The first block of a stage projects the shortcut (conv1x1 with the
block's stride + BN) whenever the stride or the width changes.

Submodules carry mmseg's names (``stem.0``, ``stem.1``, ``layer1.0.conv1``,
``layer1.0.bn1``, ``layer1.0.downsample.0``, ``layer1.0.downsample.1``...), so an
official checkpoint converts by name. BatchNorms behave as SyncBN under
``jax.jit`` with a sharded batch (statistics over the global batch).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax.numpy as jnp

from offseg_jax.models import layers
from offseg_jax.models.family import as_field, backbone_from_official, register_backbones

# mmseg's ResNet init: Kaiming normal, fan_out, ReLU gain.
_kaiming = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

# depth -> (block kind, blocks per stage), as mmseg's ``arch_settings``.
ARCH_SETTINGS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}
_EXPANSION = {"basic": 1, "bottleneck": 4}

# Output-stride layouts of the segmentation configs (``*_r50-d8``, ``*_r50-d32``...).
D32 = dict(strides=(1, 2, 2, 2), dilations=(1, 1, 1, 1), contract_dilation=True)
D8 = dict(strides=(1, 2, 1, 1), dilations=(1, 1, 2, 4), contract_dilation=True)


class BasicBlock(nn.Module):
  """conv3x3 (stride, dilation) BN ReLU, conv3x3 BN, + shortcut, ReLU (expansion 1).

  As in mmseg, only the first conv is dilated; the second always pads 1.
  """
  planes: int
  stride: int = 1
  dilation: int = 1
  downsample: bool = False
  style: str = "pytorch"         # unused: a basic block has a single strided conv
  norm_eval: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    bn_train = train and not self.norm_eval
    d = self.dilation
    out = layers.Conv2d(self.planes, 3, self.stride, d, d, use_bias=False, dtype=self.dtype,
                        kernel_init=_kaiming, name="conv1")(x)
    out = nn.relu(layers.BatchNorm(dtype=self.dtype, name="bn1")(out, bn_train))
    out = layers.Conv2d(self.planes, 3, 1, 1, use_bias=False, dtype=self.dtype,
                        kernel_init=_kaiming, name="conv2")(out)
    out = layers.BatchNorm(dtype=self.dtype, name="bn2")(out, bn_train)
    identity = _shortcut(x, self.planes, self.stride, self.downsample, bn_train, self.dtype)
    return nn.relu(out + identity)


class Bottleneck(nn.Module):
  """conv1x1 BN ReLU, conv3x3 (dilated) BN ReLU, conv1x1 (x4) BN, + shortcut, ReLU."""
  planes: int
  stride: int = 1
  dilation: int = 1
  downsample: bool = False
  style: str = "pytorch"         # 'pytorch': stride on conv2; 'caffe': on conv1
  norm_eval: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    if self.style not in ("pytorch", "caffe"):
      raise ValueError(f"{self.name}: style must be 'pytorch' or 'caffe', not {self.style!r}")
    bn_train = train and not self.norm_eval
    stride1, stride2 = (1, self.stride) if self.style == "pytorch" else (self.stride, 1)
    d = self.dilation
    out = layers.Conv2d(self.planes, 1, stride1, use_bias=False, dtype=self.dtype,
                        kernel_init=_kaiming, name="conv1")(x)
    out = nn.relu(layers.BatchNorm(dtype=self.dtype, name="bn1")(out, bn_train))
    out = layers.Conv2d(self.planes, 3, stride2, d, d, use_bias=False, dtype=self.dtype,
                        kernel_init=_kaiming, name="conv2")(out)
    out = nn.relu(layers.BatchNorm(dtype=self.dtype, name="bn2")(out, bn_train))
    out = layers.Conv2d(4 * self.planes, 1, use_bias=False, dtype=self.dtype,
                        kernel_init=_kaiming, name="conv3")(out)
    out = layers.BatchNorm(dtype=self.dtype, name="bn3")(out, bn_train)
    identity = _shortcut(x, 4 * self.planes, self.stride, self.downsample, bn_train,
                         self.dtype)
    return nn.relu(out + identity)


def _shortcut(x, features, stride, project, bn_train, dtype):
  """Identity, or mmseg's ``downsample`` = conv1x1 (stride) ``.0`` + BN ``.1``.

  Called inside a block's compact ``__call__``, so the submodules land under the
  block's scope as ``downsample.0`` / ``downsample.1``.
  """
  if not project:
    return x
  y = layers.Conv2d(features, 1, stride, use_bias=False, dtype=dtype, kernel_init=_kaiming,
                    name="downsample.0")(x)
  return layers.BatchNorm(dtype=dtype, name="downsample.1")(y, bn_train)


def block_dilations(num_blocks: int, dilation: int, contract_dilation: bool,
                    multi_grid: Sequence[int] | None = None) -> tuple[int, ...]:
  """Per-block dilations of one stage, mmseg's ``ResLayer`` rule.

  With ``multi_grid`` the blocks take its values; otherwise every block uses
  ``dilation``, except that ``contract_dilation`` halves the first block's when
  ``dilation > 1``.
  """
  if multi_grid is not None:
    if len(multi_grid) < num_blocks:
      raise ValueError(f"multi_grid {tuple(multi_grid)} has fewer than {num_blocks} entries")
    return tuple(int(m) for m in multi_grid[:num_blocks])
  first = dilation // 2 if (dilation > 1 and contract_dilation) else dilation
  return (first,) + (dilation,) * (num_blocks - 1)


class ResNetV1c(nn.Module):
  """ResNetV1c backbone: NHWC image -> tuple of NHWC stage outputs (``out_indices``).

  Fields mirror mmseg's ``ResNetV1c`` constructor. ``norm_eval`` keeps every
  BatchNorm on its running statistics even when ``train=True`` (mmseg's
  norm_eval: frozen statistics, trainable affine parameters).
  """
  depth: int = 50
  stem_channels: int = 64
  base_channels: int = 64
  num_stages: int = 4
  strides: Sequence[int] = (1, 2, 2, 2)
  dilations: Sequence[int] = (1, 1, 1, 1)
  out_indices: Sequence[int] = (0, 1, 2, 3)
  style: str = "pytorch"
  contract_dilation: bool = False
  multi_grid: Sequence[int] | None = None
  norm_eval: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images, train: bool = False):
    if self.depth not in ARCH_SETTINGS:
      raise ValueError(f"ResNet depth {self.depth} not in {sorted(ARCH_SETTINGS)}")
    if not 1 <= self.num_stages <= 4:
      raise ValueError(f"num_stages must be 1..4, not {self.num_stages}")
    if not len(self.strides) == len(self.dilations) == self.num_stages:
      raise ValueError("strides and dilations must have num_stages entries")
    if any(not 0 <= i < self.num_stages for i in self.out_indices):
      raise ValueError(f"out_indices {tuple(self.out_indices)} out of range for "
                       f"{self.num_stages} stages")
    kind, stage_blocks = ARCH_SETTINGS[self.depth]
    block_cls = Bottleneck if kind == "bottleneck" else BasicBlock
    expansion = _EXPANSION[kind]
    bn_train = train and not self.norm_eval

    # Deep stem; torch Sequential indices 2, 5, 8 are the (parameter-free) ReLUs.
    x = images
    half = self.stem_channels // 2
    for conv_idx, (features, stride) in enumerate(
        ((half, 2), (half, 1), (self.stem_channels, 1))):
      x = layers.Conv2d(features, 3, stride, 1, use_bias=False, dtype=self.dtype,
                        kernel_init=_kaiming, name=f"stem.{3 * conv_idx}")(x)
      x = layers.BatchNorm(dtype=self.dtype, name=f"stem.{3 * conv_idx + 1}")(x, bn_train)
      x = nn.relu(x)
    # torch MaxPool2d pads with -inf, as flax's max_pool does.
    x = nn.max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)))

    outs = []
    inplanes = self.stem_channels
    for i in range(self.num_stages):
      planes = self.base_channels * 2 ** i
      stride = self.strides[i]
      grid = self.multi_grid if i == self.num_stages - 1 else None
      dils = block_dilations(stage_blocks[i], self.dilations[i], self.contract_dilation, grid)
      for j, dilation in enumerate(dils):
        first = j == 0
        x = block_cls(planes, stride if first else 1, dilation,
                      downsample=first and (stride != 1 or inplanes != planes * expansion),
                      style=self.style, norm_eval=self.norm_eval, dtype=self.dtype,
                      name=f"layer{i + 1}.{j}")(x, train)
      inplanes = planes * expansion
      if i in self.out_indices:
        outs.append(x)
    return tuple(outs)


# ----------------------------------------------------------------------------
# Official config mapping and registration.
# ----------------------------------------------------------------------------

_FIELDS = ("depth", "stem_channels", "base_channels", "num_stages", "strides", "dilations",
           "out_indices", "style", "contract_dilation", "multi_grid", "norm_eval")
# Options without effect on the computation: input channels (inferred), activation
# checkpointing, weight loading and initialisation.
_NO_EFFECT = ("type", "in_channels", "with_cp", "pretrained", "init_cfg",
              "zero_init_residual")


def resnet_config_from_official(cfg: Mapping[str, Any]) -> dict:
  """Maps an mmseg ``ResNetV1c`` config onto :class:`ResNetV1c` fields.

  Raises ``ValueError`` naming the option for anything not ported: another type
  (ResNet/ResNetV1d stems differ), ``avg_down``, ``deep_stem=False``,
  ``frozen_stages``, ``dcn``/``stage_with_dcn``, ``plugins``, ``conv_cfg``, a
  norm other than trainable BN/SyncBN with eps 1e-5, unknown keys.
  """
  if cfg.get("type", "ResNetV1c") != "ResNetV1c":
    raise ValueError(f"Not a ResNetV1c config: type={cfg.get('type')!r} (only the deep-stem, "
                     "strided-shortcut ResNetV1c is ported)")
  handled = set(_FIELDS) | set(_NO_EFFECT) | {
      "deep_stem", "avg_down", "frozen_stages", "dcn", "stage_with_dcn", "plugins",
      "conv_cfg", "norm_cfg"}
  unknown = sorted(set(cfg) - handled)
  if unknown:
    raise ValueError(f"ResNetV1c option(s) {unknown} are not supported")
  if not cfg.get("deep_stem", True):
    raise ValueError("ResNetV1c option deep_stem=False is not supported (ResNetV1c has the "
                     "deep stem)")
  if cfg.get("avg_down", False):
    raise ValueError("ResNetV1c option avg_down=True is not supported (that is ResNetV1d)")
  if cfg.get("frozen_stages", -1) != -1:
    raise ValueError(f"ResNetV1c option frozen_stages={cfg['frozen_stages']} is not "
                     "supported (freeze parameters in the optimizer instead)")
  if cfg.get("dcn") is not None or any(cfg.get("stage_with_dcn", ())):
    raise ValueError("ResNetV1c option dcn (deformable convolutions) is not supported")
  if cfg.get("plugins") is not None:
    raise ValueError("ResNetV1c option plugins is not supported")
  if cfg.get("conv_cfg") is not None:
    raise ValueError(f"ResNetV1c option conv_cfg={cfg['conv_cfg']} is not supported "
                     "(plain Conv2d only)")
  norm = dict(cfg.get("norm_cfg") or {"type": "BN"})
  if (norm.get("type") not in ("BN", "SyncBN") or norm.get("eps", 1e-5) != 1e-5
      or not norm.get("requires_grad", True)):
    raise ValueError(f"ResNetV1c option norm_cfg={norm} is not supported (trainable "
                     "BN / SyncBN with eps 1e-5 only)")
  if "depth" not in cfg:
    raise ValueError("ResNetV1c config has no depth")
  if cfg["depth"] not in ARCH_SETTINGS:
    raise ValueError(f"ResNetV1c option depth={cfg['depth']} is not one of "
                     f"{sorted(ARCH_SETTINGS)}")
  if cfg.get("style", "pytorch") not in ("pytorch", "caffe"):
    raise ValueError(f"ResNetV1c option style={cfg['style']!r} is not 'pytorch' or 'caffe'")
  return {f: as_field(cfg[f]) for f in _FIELDS if f in cfg}


resnet_from_official = backbone_from_official(ResNetV1c, resnet_config_from_official)


# mmseg's segmentation layouts: ``resnet{50,101}_v1c`` (d32) and ``..._d8``.
_PRESETS = {f"resnet{depth}_v1c{suffix}": dict(depth=depth, **layout)
            for depth in (50, 101) for suffix, layout in (("", D32), ("_d8", D8))}


def _preset_doc(name: str) -> str:
  fields = _PRESETS[name]
  return (f"ResNetV1c-{fields['depth']}, strides {fields['strides']}, dilations "
          f"{fields['dilations']} (output stride {'8' if name.endswith('_d8') else '32'}).")


register_backbones(ResNetV1c, _PRESETS, family="resnet_v1c", from_official=resnet_from_official,
                   doc=_preset_doc)
