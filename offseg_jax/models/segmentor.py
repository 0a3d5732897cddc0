"""EncoderDecoder: backbone (+ refiner) (+ neck) -> decode head, the mmseg segmentor."""

from __future__ import annotations

import contextlib
from typing import Any, Sequence

import flax.linen as nn

from offseg_jax.models import layers


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
    conv_impl: how depthwise and 1x1 convolutions are traced while this model
      runs (``config.model.conv_impl``): 'conv' keeps them convolutions (the
      program an accelerator runs), 'shift' uses the CPU-tuned forms (shifted
      multiply-adds, matmuls), 'auto' leaves the choice to the enclosing
      :func:`offseg_jax.models.layers.depthwise_impl`, by default the CPU forms
      on the CPU backend only. Same parameters and results up to float rounding.
  """
  backbone: nn.Module
  decode_head: nn.Module
  neck: Any = None
  refiner: Any = None
  projection: Any = None
  projection_source: Sequence[Any] = ("neck", 0)
  remat: bool = False
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, images, train: bool = False, **inputs):
    # The convolution choice is read while the layers trace, so it scopes the
    # whole forward; 'auto' keeps the enclosing choice.
    scope = (contextlib.nullcontext() if self.conv_impl == "auto"
             else layers.depthwise_impl(self.conv_impl))
    with scope:
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


def with_conv_impl(model, conv_impl: str):
  """``model`` tracing its convolutions as ``conv_impl`` (see ``EncoderDecoder.conv_impl``)."""
  layers.check_conv_impl(conv_impl)
  if not isinstance(model, EncoderDecoder):
    raise ValueError(f"model.conv_impl needs an EncoderDecoder model, got {type(model).__name__}")
  return model.clone(conv_impl=conv_impl)
