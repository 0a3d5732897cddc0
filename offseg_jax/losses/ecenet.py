"""ECENet's training losses: mask supervision (``SDTLoss``) and diversity (``DivLoss``).

The public ECENet code is an inference-only port: its config names
``SDTLoss(num_classes, mask_weight=5.0, dice_weight=2.0, loss_weight=1.0)`` and
``DivLoss(in_channels, loss_weight=0.2)``, but neither definition is public. Both
are reconstructed here as ``shared/reference/ecenet_frm.md`` section 1.7 recommends;
each docstring says which reading it implements. The full ECENet objective is::

    config.losses = {
        "cross_entropy": {"weight": 1.0},
        "ecenet_mask": {"weight": 1.0},          # SDTLoss, loss_weight 1.0
        "ecenet_diversity": {"weight": 0.2},     # DivLoss, loss_weight 0.2
    }

Both read the :class:`~offseg_jax.models.ecenet_head.ECENetHead` aux outputs
(``'wo_mask'``; ``'div'`` and ``'div_channels'``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from offseg_jax.losses.core import register
from offseg_jax.models import layers


@register("ecenet_mask")
def ecenet_mask_loss(logits, aux, labels, *, mask_weight: float = 5.0,
                     dice_weight: float = 2.0, focal_alpha: float = 0.25,
                     focal_gamma: float = 2.0, ignore_index: int = 255,
                     mask_key: str = "wo_mask"):
  """ECENet's ``SDTLoss``: focal + dice on class-index-matched masks.

  Source: reference section 1.7(b), the [INTERP] reading grounded in the
  co-authors' ``MaskLoss`` (BebDong/EMOSeg), a SegViT-style set criterion with the
  class term off and no Hungarian matching: mask channel k is matched to class k.

  * ``aux[mask_key]`` (B, h, w, K) mask logits (the head's sum of the coarse
    masks) are bilinearly resized (align_corners=False) to the label size.
  * Per image b, the supervised pairs (b, k) are the classes present in the label
    (ignore excluded); target T = 1[label == k]. Ignored pixels are negatives for
    every supervised class; absent classes are not supervised; an image without
    a valid pixel adds nothing.
  * Focal term per pair: mean over pixels of alpha_t (1 - p_t)^gamma BCE(z, T),
    alpha_t = alpha T + (1 - alpha)(1 - T), p = sigmoid(z).
  * Dice term per pair: 1 - (2 sum(p T) + 1) / (sum(p) + sum(T) + 1).
  * Each term is summed over supervised pairs and divided by N = max(number of
    supervised pairs, 1); the loss is ``mask_weight * focal + dice_weight * dice``.

  Normaliser across devices: the reference all-reduces N and divides by the
  world size, then DDP averages the per-device gradients; the net effect is
  (sum over all devices' pairs) / (global N). This function runs under ``jit``
  on globally sharded arrays, where ``.sum()`` is already the global sum, so the
  plain ratio below is that same quantity with no explicit collective.

  Args:
    logits: unused (the final logits go to ``cross_entropy``).
    aux: head outputs; ``aux[mask_key]`` is read.
    labels: (B, H, W) integer labels.
    mask_weight, dice_weight: term weights (ECENet: 5 and 2).
    focal_alpha, focal_gamma: focal-loss parameters (0.25, 2).
    ignore_index: label value that no class claims.
    mask_key: aux entry holding the mask logits.
  """
  del logits
  num_classes = aux[mask_key].shape[-1]
  z = layers.resize_bilinear(aux[mask_key].astype(jnp.float32), labels.shape[1:3])
  labels = labels.astype(jnp.int32)
  classes = jnp.arange(num_classes, dtype=jnp.int32)
  # (B, H, W, K) one-hot targets; 255 matches no class, so ignored pixels are 0.
  target = (labels[..., None] == classes).astype(jnp.float32)
  counts = target.sum(axis=(1, 2))                                  # (B, K)
  present = (counts > 0).astype(jnp.float32)
  num_masks = jnp.maximum(present.sum(), 1.0)

  prob = jax.nn.sigmoid(z)
  # BCE with logits, stable form: max(z, 0) - z t + log(1 + exp(-|z|)).
  bce = jnp.maximum(z, 0.0) - z * target + jnp.log1p(jnp.exp(-jnp.abs(z)))
  p_t = prob * target + (1 - prob) * (1 - target)
  alpha_t = focal_alpha * target + (1 - focal_alpha) * (1 - target)
  focal = alpha_t * (1 - p_t) ** focal_gamma * bce
  focal = (focal.mean(axis=(1, 2)) * present).sum() / num_masks

  inter = (prob * target).sum(axis=(1, 2))
  dice = 1 - (2 * inter + 1) / (prob.sum(axis=(1, 2)) + counts + 1)
  dice = (dice * present).sum() / num_masks
  return mask_weight * focal + dice_weight * dice


@register("ecenet_diversity")
def ecenet_diversity_loss(logits, aux, labels, *, maps_key: str = "div",
                          channels_key: str = "div_channels"):
  """ECENet's ``DivLoss`` on the Feature Reconstruction diverse branch.

  Source: reference section 1.7(c), the [INTERP] reading: the diversity term of
  the Mutual-Channel loss (Chang et al., TIP 2020). The head supplies, per level
  l, M_l = max over channels of the spatial softmax of the gated diverse branch
  (``aux[maps_key][l]``, (B, H_l*W_l)). d_{l,b} = sum_p M_l[b, p] lies in
  [1, C'_l] (1 when all C'_l channels attend alike, C'_l when they peak at
  distinct places); the loss is

      L = (1/L) sum_l [1 - mean_b d_{l,b} / C'_l],

  with C'_l from ``aux[channels_key]`` (the head's diverse-branch widths, i.e. the
  official ``in_channels`` halved). Minimising it spreads the channels apart.
  The weight (0.2 in ECENet) is the config's ``weight``.

  Args:
    logits, labels: unused.
    aux: head outputs; ``aux[maps_key]`` and ``aux[channels_key]`` are read.
    maps_key, channels_key: aux entries of the maps and of their channel counts.
  """
  del logits, labels
  maps, channels = aux[maps_key], aux[channels_key]
  if len(maps) != len(channels):
    raise ValueError(f"{len(maps)} diversity maps but {len(channels)} channel counts")
  terms = [1.0 - jnp.mean(jnp.sum(m.astype(jnp.float32), axis=-1)) / c
           for m, c in zip(maps, channels)]
  return sum(terms) / len(terms)
