"""EncoderDecoder: backbone (+ optional neck) -> decode head, the mmseg segmentor."""

from __future__ import annotations

from typing import Any

import flax.linen as nn


class EncoderDecoder(nn.Module):
  """Composes registered components; submodule names match official checkpoints.

  ``__call__(images, train=False, **inputs)`` takes NHWC normalised images and
  returns ``(logits, aux)``: NHWC logits at the head's native stride and a dict of
  auxiliary outputs (``'backbone'``: the backbone feature maps, plus whatever the
  head adds). Extra ``inputs`` (e.g. ``ham_bases``) are forwarded to the head.
  """
  backbone: nn.Module
  decode_head: nn.Module
  neck: Any = None

  @nn.compact
  def __call__(self, images, train: bool = False, **inputs):
    feats = self.backbone(images, train=train)
    neck_out = None
    if self.neck is not None:
      neck_out = self.neck(feats, train=train)
      head_in = neck_out
    else:
      head_in = feats
    logits, aux = self.decode_head(head_in, train=train, **inputs)
    aux = dict(aux)
    aux["backbone"] = tuple(feats)
    if neck_out is not None:
      aux["neck"] = tuple(neck_out)
    return logits, aux
