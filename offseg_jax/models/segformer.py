"""SegFormer (MiT-B0..B5) with the all-MLP head, with and without Offset Learning.

Registered models (``MODELS``):
  * ``segformer_b0`` ... ``segformer_b5``: mmseg's SegFormer. ``SegformerHead``
    (per-stage 1x1 ConvModule -> bilinear to 1/4 -> concat -> ``fusion_conv``)
    with the per-pixel ``conv_seg`` classifier at 1/4, head channels 256.
  * ``segformer_b0_ol`` ... ``segformer_b5_ol``: the Offset Learning variant
    (``SegformerHeadOffsetLearning``): the same head, then a 2x2 max pool
    (1/4 -> 1/8) and Offset Learning at 1/8.

Builders take ``(num_classes, **overrides)``; an override is any field of the
backbone (``MixVisionTransformer``) or of the head (``SegformerHead``), plus
``dtype`` for both, e.g. ``segformer_b0(19, classifier='offset_learning',
drop_path_rate=0.0, channels=128)``. The pooling belongs to the head kind, not to
the classifier: ``segformer_b0_ol(150, classifier='conv')`` classifies per pixel
at 1/8.

The head's BatchNorms are SyncBN officially; ours compute statistics over the
global batch under ``jax.jit``, which is the same thing.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax.numpy as jnp

from offseg_jax.models import layers
from offseg_jax.models.classifiers import classify
from offseg_jax.models.mit import MIT_SIZES, MixVisionTransformer, mit_config_from_official
from offseg_jax.models.segmentor import EncoderDecoder
from offseg_jax.registry import HEADS, MODELS

# Official keys that carry nothing for us.
TORCH_IGNORE = (r".*\.num_batches_tracked$",)


class SegformerHead(nn.Module):
  """mmseg ``SegformerHead`` / OffSeg ``SegformerHeadOffsetLearning`` on NHWC maps.

  Attributes:
    num_classes: output classes K.
    channels: width of every projection and of the fused map (256 in mmseg).
    in_index: which backbone outputs to use; the first sets the output grid.
    classifier: a kind of :func:`offseg_jax.models.classifiers.classify`.
    pool_before_classifier: the Offset Learning head's 2x2/stride-2 max pool
      between ``fusion_conv`` and the classifier (logits at 1/8 instead of 1/4).
    dropout_ratio: Dropout2d before ``conv_seg`` (only with ``classifier='conv'``).
    dtype: computation dtype.

  ``__call__(features, train)`` returns ``(logits, {})`` with NHWC logits.
  """
  num_classes: int
  channels: int = 256
  in_index: Sequence[int] = (0, 1, 2, 3)
  classifier: str = "conv"
  pool_before_classifier: bool = False
  dropout_ratio: float = 0.1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features, train: bool = False):
    feats = [features[i] for i in self.in_index]
    size = feats[0].shape[1:3]
    projected = []
    for i, f in enumerate(feats):
      y = layers.ConvModule(self.channels, 1, norm="bn", act="relu", dtype=self.dtype,
                            name=f"convs.{i}")(f, train)
      projected.append(layers.resize_bilinear(y, size))
    x = layers.ConvModule(self.channels, 1, norm="bn", act="relu", dtype=self.dtype,
                          name="fusion_conv")(jnp.concatenate(projected, axis=-1), train)
    if self.pool_before_classifier:
      # torch MaxPool2d(2, 2): floor mode, odd trailing rows/columns are dropped.
      x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
    logits = classify(x, kind=self.classifier, num_classes=self.num_classes,
                      dropout_ratio=self.dropout_ratio, train=train, dtype=self.dtype)
    return logits, {}


def _module_fields(cls) -> set[str]:
  return {f.name for f in dataclasses.fields(cls)} - {"parent", "name"}


def as_field(value):
  """Config lists -> tuples (nested too), so module fields stay hashable."""
  if isinstance(value, (list, tuple)):
    return tuple(as_field(v) for v in value)
  return value


def build_encoder_decoder(backbone_cls, backbone_fields: Mapping[str, Any], head_cls,
                          head_fields: Mapping[str, Any],
                          overrides: Mapping[str, Any]) -> EncoderDecoder:
  """An ``EncoderDecoder`` with each override routed to the module that has it.

  ``dtype`` goes to both modules; any other name must be a field of exactly one
  of them, or a ``TypeError`` names the valid choices.
  """
  backbone_names, head_names = _module_fields(backbone_cls), _module_fields(head_cls)
  backbone_kw, head_kw = dict(backbone_fields), dict(head_fields)
  for key, value in overrides.items():
    value = as_field(value)
    if key == "dtype":
      backbone_kw[key] = head_kw[key] = value
    elif key in backbone_names and key in head_names:
      raise TypeError(f"Override {key!r} is ambiguous (backbone and head both have it)")
    elif key in backbone_names:
      backbone_kw[key] = value
    elif key in head_names and key != "num_classes":
      head_kw[key] = value
    else:
      valid = sorted((backbone_names | head_names) - {"num_classes"})
      raise TypeError(f"Unknown override {key!r}; valid: {valid}")
  return EncoderDecoder(backbone=backbone_cls(**backbone_kw),
                        decode_head=head_cls(**head_kw))


def check_segmentor_config(cfg: Mapping[str, Any]) -> None:
  """Rejects official segmentor configs with parts we do not port."""
  if cfg.get("type", "EncoderDecoder") != "EncoderDecoder":
    raise ValueError(f"Only EncoderDecoder segmentors are supported, got {cfg.get('type')!r}")
  for part in ("neck", "auxiliary_head"):
    if cfg.get(part):
      raise ValueError(f"The official config has a {part!r}, which this model lacks")


def check_head_config(head: Mapping[str, Any], norm_types: Sequence[str]) -> str:
  """Validates the generic ``BaseDecodeHead`` options; returns our norm name."""
  if head.get("align_corners", False):
    raise ValueError("align_corners=True heads are not supported")
  act = head.get("act_cfg", {"type": "ReLU"})
  if act.get("type") != "ReLU":
    raise ValueError(f"Head act_cfg {act} is not supported (ReLU only)")
  if len(head.get("in_channels", ())) != len(head.get("in_index", ())):
    raise ValueError("in_channels and in_index must have the same length")
  norm = head.get("norm_cfg") or {}
  if norm.get("type") not in norm_types:
    raise ValueError(f"Head norm_cfg {norm} is not supported (expected {norm_types})")
  return "gn" if norm["type"] == "GN" else "bn"


def check_in_channels(head: Mapping[str, Any], widths: Sequence[int]) -> None:
  """The head's declared ``in_channels`` must be the selected backbone widths."""
  selected = [widths[i] for i in head["in_index"]]
  if list(head["in_channels"]) != selected:
    raise ValueError(f"Head in_channels {list(head['in_channels'])} do not match the "
                     f"backbone outputs {selected} selected by in_index")


def segformer_head_from_official(head: Mapping[str, Any], num_classes: int) -> SegformerHead:
  """Maps an mmseg ``SegformerHead`` / ``SegformerHeadOffsetLearning`` config."""
  kind = head.get("type")
  if kind not in ("SegformerHead", "SegformerHeadOffsetLearning"):
    raise ValueError(f"Not a SegFormer head config: {kind!r}")
  check_head_config(head, ("BN", "SyncBN"))
  if head.get("interpolate_mode", "bilinear") != "bilinear":
    raise ValueError("Only bilinear interpolate_mode is supported")
  ol = kind == "SegformerHeadOffsetLearning"
  return SegformerHead(
      num_classes=num_classes,
      channels=head["channels"],
      in_index=tuple(head["in_index"]),
      classifier="offset_learning" if ol else "conv",
      pool_before_classifier=ol,
      dropout_ratio=head.get("dropout_ratio", 0.1))


def segformer_from_official(cfg: Mapping[str, Any], num_classes: int) -> EncoderDecoder:
  """Builds our model from an official SegFormer(-OL) ``EncoderDecoder`` config."""
  check_segmentor_config(cfg)
  backbone = MixVisionTransformer(**mit_config_from_official(cfg["backbone"]))
  head = segformer_head_from_official(cfg["decode_head"], num_classes)
  widths = [backbone.embed_dims * n for n in backbone.num_heads]
  check_in_channels(cfg["decode_head"], widths)
  return EncoderDecoder(backbone=backbone, decode_head=head)


@HEADS.register("segformer_head")
def build_segformer_head(num_classes: int, **fields) -> SegformerHead:
  """SegformerHead with ``fields`` overriding its defaults (plain mmseg head)."""
  return SegformerHead(num_classes=num_classes,
                       **{k: as_field(v) for k, v in fields.items()})


def _register_models():
  for size, backbone_fields in MIT_SIZES.items():
    for ol in (False, True):
      head_fields = dict(channels=256, classifier="offset_learning" if ol else "conv",
                         pool_before_classifier=ol)

      def build(num_classes: int, _b=backbone_fields, _h=head_fields, **overrides):
        return build_encoder_decoder(MixVisionTransformer, _b, SegformerHead,
                                     dict(_h, num_classes=num_classes), overrides)

      name = f"segformer_{size}" + ("_ol" if ol else "")
      build.__doc__ = (f"SegFormer-{size.upper()}" + (
          " + Offset Learning (max pool to 1/8, OL classifier)" if ol else
          " (mmseg SegformerHead, conv_seg at 1/4)") + ".")
      MODELS.register(name, from_official=segformer_from_official,
                      torch_ignore=TORCH_IGNORE)(build)


_register_models()
