"""FRM's contrastive term: supervised pixel contrast with hard/easy anchor sampling.

Source: the FRM reviews say only that the network is "trained with a hybrid loss
that combines cross-entropy and a contrastive term" (shared/reference/ecenet_frm.md
§2.3); the pixel sampling, temperature, weight and projection head are not
public. This term follows the recommended documented default, the supervised
pixel contrast of Wang et al., ICCV 2021 ("Exploring Cross-Image Pixel
Contrast for Semantic Segmentation"), with its public defaults, without the
memory banks. docs/frm.md lists every choice.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from offseg_jax.losses.core import register
from offseg_jax.models import layers


def _to_grid(x, size):
  """torch ``F.interpolate(mode='nearest')`` of an integer (B, H, W) map to ``size``."""
  return layers.resize_nearest(x[..., None], size)[..., 0]


def sample_anchors(labels, predictions, num_classes: int, key, *, max_samples: int = 1024,
                   max_views: int = 100):
  """Per-class hard/easy anchor sampling with static shapes.

  A (image, class) pair is present when the class has more than ``max_views``
  pixels in that image. With T present pairs, every pair gets
  ``n_view = min(max_samples // T, max_views)`` anchors: ``n_view // 2`` hard
  ones (label c, prediction != c) and the rest easy (label c, prediction c),
  taking the shortfall from the other kind when one kind has fewer than
  ``n_view / 2`` pixels. Pixels are drawn uniformly without replacement: each
  image's pixels are sorted by (label, easy, uniform noise from ``key``) and each
  pair reads its first hard and first easy pixels.

  Args:
    labels: (B, N) int labels on the embedding grid; values outside
      ``[0, num_classes)`` (the ignore label) are never sampled.
    predictions: (B, N) int predicted classes on the same grid.
    num_classes: K.
    key: PRNG key for the draw.
    max_samples: anchor budget over the batch.
    max_views: most anchors per (image, class), and the presence threshold.

  Returns:
    ``(image, pixel, label, valid)``, each of static length
    ``M = min(max_samples, max_views * B * K)``: anchor m is pixel ``pixel[m]``
    of image ``image[m]`` with class ``label[m]`` where ``valid[m]``.
  """
  b, n = labels.shape
  k = int(num_classes)
  labels = labels.astype(jnp.int32)
  # Class K collects the ignored pixels (and any out-of-range label).
  labels = jnp.where((labels >= 0) & (labels < k), labels, k)
  easy = (predictions.astype(jnp.int32) == labels) & (labels < k)
  counts = jax.vmap(lambda l: jnp.bincount(l, length=k + 1))(labels)
  n_easy = jax.vmap(lambda l, e: jnp.bincount(l, weights=e, length=k + 1))(
      labels, easy.astype(jnp.int32)).astype(jnp.int32)
  n_hard = counts - n_easy
  present = counts[:, :k] > max_views                                   # (B, K)
  total = jnp.sum(present)
  n_view = jnp.minimum(max_samples // jnp.maximum(total, 1), max_views)
  safe_view = jnp.maximum(n_view, 1)
  hard_ok = 2 * n_hard >= n_view
  easy_ok = 2 * n_easy >= n_view
  hard_keep = jnp.where(hard_ok & easy_ok, n_view // 2,
                        jnp.where(hard_ok, n_view - n_easy, n_hard))

  # Per image: the pixels of class c sit at [start_c, start_c + count_c) of
  # `order`, hard ones first, each group in random order.
  noise = jax.random.uniform(key, (b, n))
  order = jax.vmap(lambda u, g: jnp.lexsort((u, g)))(noise, 2 * labels + easy)
  start = jnp.cumsum(counts, axis=1) - counts

  m = int(min(max_samples, max_views * b * k))
  j = jnp.arange(m)
  rank, view = j // safe_view, j % safe_view
  valid = (rank < total) & (n_view > 0)
  slots = jnp.nonzero(present.reshape(-1), size=b * k, fill_value=0)[0]
  slot = slots[jnp.clip(rank, 0, b * k - 1)]
  image, cls = slot // k, slot % k
  keep_h = hard_keep[image, cls]
  offset = jnp.where(view < keep_h, view, n_hard[image, cls] + view - keep_h)
  pos = jnp.clip(start[image, cls] + offset, 0, n - 1)
  pixel = order[image, pos]
  return image, pixel, cls, valid


def contrast(features, anchor_labels, valid, *, temperature: float = 0.1,
             base_temperature: float = 0.07):
  """Supervised contrastive loss over the valid anchors (every anchor is also a contrast).

  For anchor i, with s_ij = f_i . f_j / temperature, positives P(i) = same class,
  j != i, negatives = other classes:
  ``L_i = -(temperature / base_temperature) * mean_{p in P(i)} [s_ip -
  log(exp(s_ip) + sum_n exp(s_in))]``, averaged over anchors that have a
  positive (an anchor without one would be 0/0 in the reference; it is left out).
  Row maxima (no gradient) are subtracted for stability, which cancels exactly.
  """
  f = features.astype(jnp.float32)
  s = (f @ f.T) / temperature
  both = valid[:, None] & valid[None, :]
  # The row max over valid contrasts; filled with a finite value elsewhere so
  # that nothing in the graph is inf even without any valid anchor.
  fill = jnp.min(s)
  row_max = jax.lax.stop_gradient(
      jnp.max(jnp.where(valid[None, :], s, fill), axis=1, keepdims=True))
  logits = s - row_max
  same = anchor_labels[:, None] == anchor_labels[None, :]
  positive = same & both & ~jnp.eye(s.shape[0], dtype=bool)
  negative = ~same & both
  exp = jnp.exp(logits)
  neg_sum = jnp.sum(jnp.where(negative, exp, 0.0), axis=1, keepdims=True)
  log_prob = logits - jnp.log(exp + neg_sum)
  n_pos = jnp.sum(positive, axis=1)
  mean_pos = jnp.sum(jnp.where(positive, log_prob, 0.0), axis=1) / jnp.maximum(n_pos, 1)
  counted = valid & (n_pos > 0)
  per_anchor = -(temperature / base_temperature) * mean_pos
  return jnp.sum(jnp.where(counted, per_anchor, 0.0)) / jnp.maximum(jnp.sum(counted), 1)


@register("pixel_contrastive")
def pixel_contrastive(logits, aux, labels, *, temperature: float = 0.1,
                      base_temperature: float = 0.07, max_samples: int = 1024,
                      max_views: int = 100, warmup_steps: int = 5000,
                      ignore_index: int = 255, embedding_key: str = "embedding",
                      seed: int = 0, step: Any):
  """Supervised pixel-contrastive loss on ``aux[embedding_key]`` (FRM's contrastive term).

  Source: reference §2.3 (FRM trains with cross-entropy plus a contrastive term;
  its details are unknown) and the formulation it recommends, the supervised
  pixel contrast of Wang et al. (ICCV 2021) with its public defaults (memory
  banks omitted). The choices, all of which are arguments:

  * the embedding is ``aux[embedding_key]``, NHWC (B, h, w, D), expected
    l2-normalised (``models.frm.ProjectionHead``);
  * labels are downsampled to (h, w) with nearest (torch index rule
    ``floor(dst * in / out)``); the prediction is the argmax of ``logits``,
    brought to (h, w) the same way when the head's grid differs (identity when
    the projection reads the head's grid, as in the reference);
  * anchors: per (image, class) with more than ``max_views`` labelled pixels,
    ``n_view = min(max_samples // #pairs, max_views)`` pixels, half hard
    (misclassified) and half easy, the shortfall taken from the other half
    (:func:`sample_anchors`); ``ignore_index`` pixels are never anchors;
  * randomness: uniform noise from ``fold_in(PRNGKey(seed), step)``, so a step
    always draws the same pixels (reproducible, jit-friendly; no RNG plumbing);
  * fixed shapes: at most ``min(max_samples, max_views * B * K)`` anchors with a
    validity mask, so the term runs under ``jax.jit``;
  * loss: :func:`contrast` with ``temperature`` (0.1) and ``base_temperature``
    (0.07), every sampled pixel being both anchor and contrast, positives across
    images; anchors without a positive are left out of the mean;
  * warm-up: 0 (and no computation) while ``step < warmup_steps``.

  Returns 0 when no class is present often enough.
  """
  if embedding_key not in aux:
    raise KeyError(f"pixel_contrastive needs aux[{embedding_key!r}] (a projection head "
                   f"on the model); aux has {sorted(aux)}")
  emb = jnp.asarray(aux[embedding_key], jnp.float32)
  logits, labels = jnp.asarray(logits), jnp.asarray(labels)
  b, h, w, d = emb.shape
  num_classes = logits.shape[-1]
  grid_labels = _to_grid(labels, (h, w))
  grid_labels = jnp.where(grid_labels == ignore_index, -1, grid_labels).reshape(b, h * w)
  pred = _to_grid(jnp.argmax(logits, axis=-1), (h, w)).reshape(b, h * w)
  step = jnp.asarray(step, jnp.int32)

  def compute():
    key = jax.random.fold_in(jax.random.PRNGKey(seed), step)
    image, pixel, cls, valid = sample_anchors(
        grid_labels, pred, num_classes, key, max_samples=max_samples, max_views=max_views)
    feats = emb.reshape(b, h * w, d)[image, pixel]
    return contrast(feats, cls, valid, temperature=temperature,
                    base_temperature=base_temperature)

  return jax.lax.cond(step >= warmup_steps, compute, lambda: jnp.zeros((), jnp.float32))
