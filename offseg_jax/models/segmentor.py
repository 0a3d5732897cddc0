"""EncoderDecoder: backbone (+ refiner) (+ neck) -> decode head, the mmseg segmentor."""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn


class EncoderDecoder(nn.Module):
  """Composes registered components; submodule names match official checkpoints.

  ``__call__(images, train=False, **inputs)`` takes NHWC normalised images and
  returns ``(logits, aux)``: NHWC logits at the head's native stride and a dict of
  auxiliary outputs (``'backbone'``: the backbone feature maps, ``'neck'`` when a
  neck exists, ``'embedding'`` when a projection head exists, plus whatever the
  head adds). Extra ``inputs`` (e.g. ``ham_bases``) are forwarded to the head.

  Attributes:
    backbone: image -> tuple of feature maps.
    decode_head: features -> ``(logits, aux)``.
    refiner: optional features -> features module applied to the backbone
      outputs before the neck (FRM refines the 1/32 level this way).
    neck: optional features -> features module (e.g. FPN).
    projection: optional module mapping one feature map to a pixel embedding
      (``aux['embedding']``) for embedding losses; it runs in training and at
      initialisation only, so evaluation pays nothing for it.
    projection_source: ``(stage, index)`` of the map the projection reads;
      stage is ``'backbone'``, ``'refined'`` or ``'neck'``.
    remat: rematerialise the whole backbone: in training, only its input and
      output feature maps are kept for the backward pass, and its forward is
      recomputed there (``nn.remat``), trading one extra backbone forward per
      step for the backbone's activation memory. Parameter names, outputs and
      gradients are unchanged, so checkpoints work either way.
  """
  backbone: nn.Module
  decode_head: nn.Module
  neck: Any = None
  refiner: Any = None
  projection: Any = None
  projection_source: Sequence[Any] = ("neck", 0)
  remat: bool = False

  @nn.compact
  def __call__(self, images, train: bool = False, **inputs):
    if self.remat and train:
      # A lifted checkpoint over the bound backbone: same variable scope (names).
      feats = nn.remat(lambda backbone, x: tuple(backbone(x, train=True)))(
          self.backbone, images)
    else:
      feats = tuple(self.backbone(images, train=train))
    stages = {"backbone": feats}
    head_in = feats
    if self.refiner is not None:
      head_in = tuple(self.refiner(head_in, train=train))
      stages["refined"] = head_in
    if self.neck is not None:
      head_in = tuple(self.neck(head_in, train=train))
      stages["neck"] = head_in
    logits, aux = self.decode_head(head_in, train=train, **inputs)
    aux = dict(aux)
    aux["backbone"] = feats
    if self.neck is not None:
      aux["neck"] = stages["neck"]
    if self.projection is not None and (train or self.is_initializing()):
      stage, index = self.projection_source
      if stage not in stages:
        raise ValueError(f"projection_source {tuple(self.projection_source)} names a "
                         f"stage this model lacks; it has {sorted(stages)}")
      aux["embedding"] = self.projection(stages[stage][int(index)], train=train)
    return logits, aux


def with_remat(model, remat: bool = True):
  """``model`` with its backbone rematerialised (see ``EncoderDecoder.remat``)."""
  if not isinstance(model, EncoderDecoder):
    raise ValueError(f"model.remat needs an EncoderDecoder model, got {type(model).__name__}")
  return model.clone(remat=bool(remat))
