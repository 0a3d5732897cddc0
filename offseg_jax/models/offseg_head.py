"""OffSegHead: FreqFusion pyramid decoder ending in a selectable classifier.

1. ``pre.i``: 1x1 conv + GN(32) + ReLU on each of the 4 backbone maps.
2. Top-down, three ``FreqFusion`` stages fuse the running coarse feature with the
   next finer map. After each, the boosted skip feature and the upsampled coarse
   feature are concatenated with a 4-group channel interleave
   [h0, l0, h1, l1, h2, l2, h3, l3] (quarters of each), so resample group q of the
   next FreqFusion always holds the q-th quarter of every pyramid level.
3. ``align``: 1x1 conv + GN(32) + ReLU to ``channels`` at stride 4.
4. ``classifiers.classify`` (Offset Learning by default, ``'conv'`` etc. by field).
"""

from __future__ import annotations

from typing import Any, Sequence

from einops import rearrange
import flax.linen as nn
import jax.numpy as jnp

from offseg_jax.models import classifiers, layers
from offseg_jax.models.freqfusion import FreqFusion
from offseg_jax.registry import HEADS

Dtype = Any


def interleave_quarters(hr, lr):
  """Concatenates two NHWC maps as [hr_q0, lr_q0, ..., hr_q3, lr_q3] along channels.

  The official code folds the channels into 4 batch slots, concatenates and
  unfolds; per sample that is this interleave of contiguous quarters.
  """
  c_hr, c_lr = hr.shape[-1], lr.shape[-1]
  if c_hr % 4 or c_lr % 4:
    raise ValueError(f"the 4-group interleave needs channel counts divisible by 4, "
                     f"got {c_hr} and {c_lr}")
  quarters = lambda t: rearrange(t, "b h w (q c) -> b h w q c", q=4)
  mixed = jnp.concatenate([quarters(hr), quarters(lr)], axis=-1)
  return rearrange(mixed, "b h w q c -> b h w (q c)")


class OffSegHead(nn.Module):
  """The OffSeg decode head on 4 feature maps at strides 4, 8, 16, 32.

  Attributes:
    num_classes: K.
    new_channels: widths after the ``pre`` convs, finest first.
    channels: width of ``align`` (the classifier's embedding dim C).
    classifier: a ``classifiers.KINDS`` name.
    dropout_ratio: Dropout2d before a ``'conv'`` classifier (unused by Offset Learning,
      as in the official head).
    num_groups: GroupNorm groups of the ConvModules.
  """
  num_classes: int
  new_channels: Sequence[int] = (32, 32, 64, 128)
  channels: int = 256
  classifier: str = "offset_learning"
  dropout_ratio: float = 0.1
  num_groups: int = 32
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, features, train: bool = False):
    if len(features) != len(self.new_channels):
      raise ValueError(f"OffSegHead got {len(features)} feature maps for "
                       f"{len(self.new_channels)} new_channels")
    pre = [layers.ConvModule(c, 1, norm="gn", num_groups=self.num_groups, act="relu",
                             dtype=self.dtype, name=f"pre.{i}")(f, train)
           for i, (f, c) in enumerate(zip(features, self.new_channels))]
    coarse_to_fine = pre[::-1]
    low = coarse_to_fine[0]
    low_c = self.new_channels[-1]
    for j, high in enumerate(coarse_to_fine[1:]):
      high_c = high.shape[-1]
      fuse = FreqFusion(compressed_channels=(low_c + high_c) // 4, dtype=self.dtype,
                        name=f"freqfusions.{j}")
      _, high, low_up = fuse(high, low)
      low = interleave_quarters(high, low_up)
      low_c += high_c
    x = layers.ConvModule(self.channels, 1, norm="gn", num_groups=self.num_groups, act="relu",
                          dtype=self.dtype, name="align")(low, train)
    logits = classifiers.classify(x, kind=self.classifier, num_classes=self.num_classes,
                                  dropout_ratio=self.dropout_ratio, train=train, dtype=self.dtype)
    return logits, {}


@HEADS.register("offseg_head")
def build_offseg_head(num_classes: int, **fields) -> OffSegHead:
  """OffSegHead with ``fields`` overriding its defaults (OffSeg-T sizes)."""
  if "new_channels" in fields:
    fields["new_channels"] = tuple(int(c) for c in fields["new_channels"])
  return OffSegHead(num_classes=num_classes, **fields)
