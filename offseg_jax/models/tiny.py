"""Small reference models for tests and baselines.

* ``tiny``: a 4-stage conv backbone (strides 4..32) with an FPN-style head that
  ends in :func:`classifiers.classify`; seconds to train on CPU, used by tests
  that need a real trainable segmentor without the cost of a paper model.
* ``pixel_linear``: the per-pixel colour classifier (1x1 convolutions only, no
  spatial context) used to show that the synthetic default is not solvable by
  colour alone.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from offseg_jax.models import classifiers, layers, segmentor
from offseg_jax.registry import BACKBONES, HEADS, MODELS


@BACKBONES.register("tiny_convnet")
class TinyConvNet(nn.Module):
  """Conv-BN-ReLU stages at strides 4, 8, 16, 32."""
  widths: Sequence[int] = (16, 32, 64, 96)
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    outs = []
    x = layers.ConvModule(self.widths[0], 3, 2, 1, norm="bn", dtype=self.dtype, name="stem")(x, train)
    for i, w in enumerate(self.widths):
      x = layers.ConvModule(w, 3, 2, 1, norm="bn", dtype=self.dtype, name=f"stages.{i}.0")(x, train)
      x = layers.ConvModule(w, 3, 1, 1, norm="bn", dtype=self.dtype, name=f"stages.{i}.1")(x, train)
      outs.append(x)
    return tuple(outs)


@HEADS.register("tiny_fpn_head")
class TinyFPNHead(nn.Module):
  """Lateral 1x1 convs, top-down sum at stride 4, 3x3 fuse, then the classifier."""
  num_classes: int
  channels: int = 64
  classifier: str = "conv"
  dropout_ratio: float = 0.1
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, feats, train: bool = False):
    size = feats[0].shape[1:3]
    x = 0
    for i, f in enumerate(feats):
      y = layers.ConvModule(self.channels, 1, norm="bn", dtype=self.dtype, name=f"lateral.{i}")(f, train)
      x = x + layers.resize_bilinear(y, size)
    x = layers.ConvModule(self.channels, 3, 1, 1, norm="bn", dtype=self.dtype, name="fuse")(x, train)
    logits = classifiers.classify(x, kind=self.classifier, num_classes=self.num_classes,
                                  dropout_ratio=self.dropout_ratio, train=train, dtype=self.dtype)
    return logits, {}


@MODELS.register("tiny")
def tiny(num_classes: int, widths=(16, 32, 64, 96), channels: int = 64,
         classifier: str = "conv", dtype=jnp.float32):
  """Small conv segmentor (stride-4 logits) for tests and quick experiments."""
  return segmentor.EncoderDecoder(
      backbone=TinyConvNet(tuple(widths), dtype=dtype),
      decode_head=TinyFPNHead(num_classes, channels, classifier, dtype=dtype))


class _PixelBackbone(nn.Module):
  """Identity 'backbone': the normalised pixels themselves, at stride 1."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    return (x,)


class _PixelMLPHead(nn.Module):
  num_classes: int
  hidden: int = 64
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, feats, train: bool = False):
    del train
    x = nn.relu(layers.Conv2d(self.hidden, 1, dtype=self.dtype, name="fc1")(feats[0]))
    x = nn.relu(layers.Conv2d(self.hidden, 1, dtype=self.dtype, name="fc2")(x))
    logits = layers.Conv2d(self.num_classes, 1, dtype=self.dtype, name="conv_seg")(x)
    return logits.astype(jnp.float32), {}


@MODELS.register("pixel_linear")
def pixel_linear(num_classes: int, hidden: int = 64, dtype=jnp.float32):
  """Per-pixel colour classifier: 1x1 convolutions only (no spatial context)."""
  return segmentor.EncoderDecoder(backbone=_PixelBackbone(),
                                  decode_head=_PixelMLPHead(num_classes, hidden, dtype))
