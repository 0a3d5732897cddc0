"""OffSeg-T/B/L: EfficientFormerV2 (S1/S2/L) + OffSegHead, registered as models.

``offseg_t``, ``offseg_b`` and ``offseg_l`` are builders
``(num_classes, **overrides) -> EncoderDecoder``. Overrides:

  * ``classifier``: a ``classifiers.KINDS`` name (default ``'offset_learning'``);
  * ``dtype``: computation dtype (``'bfloat16'`` or a jnp dtype);
  * ``drop_path_rate``: backbone stochastic depth (official: 0 / 0.02 / 0.1);
  * ``backbone``: a dict of ``EfficientFormerV2`` field overrides (widths, depths,
    expansion_ratios, vit_num, resolution, ...), e.g. for a reduced variant;
  * ``head``: a dict of ``OffSegHead`` field overrides (new_channels, channels, ...).

``from_official`` maps an official mmseg model config (backbone type
``efficientformerv2_{s1,s2,l}_feat``, decode head ``OffSegHead``) onto the same
modules. Official buffers that we recompute or that carry nothing are ignored
in conversion (``torch_ignore``).
"""

from __future__ import annotations

from typing import Any, Mapping

import jax.numpy as jnp

from offseg_jax.models import efficientformer_v2, offseg_head  # noqa: F401  (registration)
from offseg_jax.models.segmentor import EncoderDecoder
from offseg_jax.registry import BACKBONES, HEADS, MODELS

VARIANTS = {
    "offseg_t": dict(backbone="efficientformerv2_s1_feat", new_channels=(32, 32, 64, 128)),
    "offseg_b": dict(backbone="efficientformerv2_s2_feat", new_channels=(32, 64, 128, 256)),
    "offseg_l": dict(backbone="efficientformerv2_l_feat", new_channels=(32, 64, 128, 256)),
}
_BY_BACKBONE = {spec["backbone"]: name for name, spec in VARIANTS.items()}
_BACKBONE_WIDTHS = {
    "efficientformerv2_s1_feat": efficientformer_v2.WIDTHS["S1"],
    "efficientformerv2_s2_feat": efficientformer_v2.WIDTHS["S2"],
    "efficientformerv2_l_feat": efficientformer_v2.WIDTHS["L"],
}

# Official state-dict entries that are not weights of ours:
#   * EfficientFormerV2 bias indices (recomputed) and the ImageNet-sized
#     ``attention_biases`` buffers, which the segmentation copy never reads;
#   * FreqFusion's constant ``init_pos`` and ``hamming_*`` (= [1.0]) buffers.
TORCH_IGNORE = (
    r"^backbone\..*\.attention_biases$",
    r"^backbone\..*\.attention_bias_idxs(_seg)?$",
    r"^decode_head\.freqfusions\.\d+\.dysampler\.init_pos$",
    r"^decode_head\.freqfusions\.\d+\.hamming_(lowpass|highpass)$",
)


def build_offseg(variant: str, num_classes: int, *, classifier: str = "offset_learning",
                 dtype: Any = jnp.float32, drop_path_rate: float | None = None,
                 backbone: Mapping[str, Any] | None = None,
                 head: Mapping[str, Any] | None = None) -> EncoderDecoder:
  """Builds OffSeg ``variant`` ('offseg_t' / 'offseg_b' / 'offseg_l')."""
  spec = VARIANTS[variant]
  dtype = jnp.dtype(dtype)
  backbone_fields = dict(backbone or {})
  if drop_path_rate is not None:
    backbone_fields["drop_path_rate"] = float(drop_path_rate)
  head_fields = {"new_channels": spec["new_channels"], **dict(head or {})}
  return EncoderDecoder(
      backbone=BACKBONES.build(spec["backbone"], dtype=dtype, **backbone_fields),
      decode_head=HEADS.build("offseg_head", num_classes, classifier=classifier, dtype=dtype,
                              **head_fields))


def from_official(official_config: Mapping[str, Any], num_classes: int,
                  **overrides) -> EncoderDecoder:
  """Builds the OffSeg model an official mmseg config describes.

  Accepts the segmentor config (``type='EncoderDecoder'``) or a dict holding it
  under ``'model'``. The backbone type picks the variant; the head's
  ``new_channels``, ``channels`` and GN groups are taken from the config, and
  ``in_channels`` must match the backbone. ``overrides`` go to the builder.
  """
  cfg = official_config.get("model", official_config)
  bb_cfg, head_cfg = dict(cfg["backbone"]), dict(cfg["decode_head"])
  bb_type = bb_cfg.pop("type")
  if bb_type not in _BY_BACKBONE:
    raise ValueError(f"Not an OffSeg backbone: {bb_type!r}; expected one of {sorted(_BY_BACKBONE)}")
  if head_cfg.get("type") != "OffSegHead":
    raise ValueError(f"Not an OffSeg head: {head_cfg.get('type')!r}")
  widths = tuple(head_cfg.get("in_channels", _BACKBONE_WIDTHS[bb_type]))
  if widths != tuple(_BACKBONE_WIDTHS[bb_type]):
    raise ValueError(f"decode_head.in_channels {widths} do not match {bb_type} "
                     f"widths {_BACKBONE_WIDTHS[bb_type]}")
  if list(head_cfg.get("in_index", [0, 1, 2, 3])) != [0, 1, 2, 3]:
    raise ValueError("OffSegHead reads all 4 backbone stages (in_index [0, 1, 2, 3])")
  norm = head_cfg.get("norm_cfg") or {}
  if norm.get("type", "GN") != "GN":
    raise ValueError(f"OffSegHead is built with GroupNorm; got norm_cfg {norm}")
  cfg_classes = head_cfg.get("num_classes", num_classes)
  if cfg_classes != num_classes:
    raise ValueError(f"config has {cfg_classes} classes, {num_classes} requested")

  backbone = dict(overrides.pop("backbone", None) or {})
  if "resolution" in bb_cfg:      # the only backbone kwarg a config can change
    backbone.setdefault("resolution", int(bb_cfg["resolution"]))
  head = {"new_channels": tuple(head_cfg["new_channels"]),
          "channels": int(head_cfg.get("channels", 256)),
          "num_groups": int(norm.get("num_groups", 32)),
          "dropout_ratio": float(head_cfg.get("dropout_ratio", 0.1)),
          **dict(overrides.pop("head", None) or {})}
  return build_offseg(_BY_BACKBONE[bb_type], num_classes, backbone=backbone, head=head,
                      **overrides)


def _register(variant: str):
  def build(num_classes: int, **overrides) -> EncoderDecoder:
    return build_offseg(variant, num_classes, **overrides)

  size = variant[-1].upper()
  build.__doc__ = (f"OffSeg-{size}: {VARIANTS[variant]['backbone']} + OffSegHead "
                   "(Offset Learning classifier by default).")
  MODELS.register(variant, from_official=from_official, torch_ignore=TORCH_IGNORE)(build)


for _variant in VARIANTS:
  _register(_variant)


# A reduced member of the family for CPU-scale experiments (the synthetic
# default and the Table 6 ablation): the same modules as OffSeg-T — EfficientFormerV2
# stages with attention in the last blocks, the FreqFusion decoder and Offset
# Learning — at a fraction of the width, depth and attention size. No official
# checkpoint exists for it.
NANO_BACKBONE = dict(widths=(32, 48, 96, 128), depths=(2, 2, 3, 2),
                     expansion_ratios=((4, 4), (4, 4), (4, 4, 4), (4, 4)), vit_num=1,
                     num_heads=4, key_dim=16, attn_ratio=2, downsample_key_dim=16,
                     drop_path_rate=0.0,
                     # Trained from scratch, not fine-tuned: residual branches start
                     # at 1e-2 (as MSCAN) rather than the ImageNet recipe's 1e-5.
                     layer_scale_init=1e-2)
NANO_HEAD = dict(new_channels=(32, 32, 64, 64), channels=128)


@MODELS.register("offseg_nano")
def offseg_nano(num_classes: int, *, backbone: Mapping[str, Any] | None = None,
                head: Mapping[str, Any] | None = None, **overrides) -> EncoderDecoder:
  """OffSeg-nano: a reduced EfficientFormerV2 + OffSegHead for CPU-scale runs."""
  return build_offseg("offseg_t", num_classes,
                      backbone={**NANO_BACKBONE, **dict(backbone or {})},
                      head={**NANO_HEAD, **dict(head or {})}, **overrides)
