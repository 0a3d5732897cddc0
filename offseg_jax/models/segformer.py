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

from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax.numpy as jnp

from offseg_jax.models import layers
from offseg_jax.models.classifiers import classify
from offseg_jax.models.family import (check_in_channels, check_segmentor_config,
                                      offset_learning_variant, register_head, register_models)
from offseg_jax.models.mit import MIT_SIZES, MixVisionTransformer, mit_config_from_official
from offseg_jax.models.segmentor import EncoderDecoder

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
      # torch MaxPool2d(2, 2): floor mode, odd trailing rows/columns are dropped;
      # the gradient goes to the first maximum of each window, as torch's.
      x = layers.max_pool(x, (2, 2), (2, 2))
    logits = classify(x, kind=self.classifier, num_classes=self.num_classes,
                      dropout_ratio=self.dropout_ratio, train=train, dtype=self.dtype)
    return logits, {}


def segformer_head_from_official(head: Mapping[str, Any], num_classes: int) -> SegformerHead:
  """Maps an mmseg ``SegformerHead`` / ``SegformerHeadOffsetLearning`` config."""
  ol = offset_learning_variant(head, "SegformerHead", ("BN", "SyncBN"))
  if head.get("interpolate_mode", "bilinear") != "bilinear":
    raise ValueError("Only bilinear interpolate_mode is supported")
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


register_head("segformer_head", SegformerHead,
              doc="SegformerHead with ``fields`` overriding its defaults (plain mmseg head).")


register_models(
    "segformer", MIT_SIZES, backbone_cls=MixVisionTransformer, head_cls=SegformerHead,
    head_fields=lambda size, ol: dict(channels=256, pool_before_classifier=ol,
                                      classifier="offset_learning" if ol else "conv"),
    doc=lambda size, ol: f"SegFormer-{size.upper()}" + (
        " + Offset Learning (max pool to 1/8, OL classifier)." if ol else
        " (mmseg SegformerHead, conv_seg at 1/4)."),
    from_official=segformer_from_official, torch_ignore=TORCH_IGNORE)
