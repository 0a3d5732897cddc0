"""The jitted evaluation steps, data-parallel over a 1-D ('data',) device mesh.

Every step is a ``shard_map`` over the mesh: each device runs its own images
with replicated variables and never talks to another device, so the steps
scale with the devices of every host. Batches are global arrays whose leading
axis is the batch (see :mod:`offseg_jax.evaluation.geometry` for their keys).

Three kinds of steps, compiled once per static shape (:attr:`Engine.compiles`
counts every trace):

* :meth:`Engine.forward` -- the model. Input ``(B, n, H, W, 3)`` (``n`` images or
  windows per example), uint8 normalised here (float32: taken as normalised),
  pixels outside each example's valid size set to 0 (the mean colour), then
  zero-padded to the model's size divisor. Each image (or window) runs as a
  batch of one under ``vmap`` with its own ``'ham'`` key, folded from the
  example's index, so results never depend on how images are batched or on
  the number of devices. Returns float32 logits at the model's stride. In whole
  mode this compiles once per bucket; in slide mode once per window shape,
  whatever the image size.
* :meth:`Engine.windows` -- cuts the slide windows of a bucket out of the
  images (uint8), a group of window slots per model call.
* :meth:`Engine.finish` -- one image per device at a time: per view, logits
  resized to the model input (whole; composed with the label resize into one
  3-tap map per axis) or window logits resized to the window, summed into a
  canvas and divided by the window count (slide); then the per-image taps of
  :func:`geometry.bilinear_taps` crop the padding, un-flip and resize to the
  label size; softmax-averaged over TTA views; argmax; and the integer
  confusion matrix of the labelled pixels added to a per-device accumulator.
  This label-resolution work runs over tiles, as many as the image's label
  needs, and in whole mode skips the per-class work on tiles whose pixels
  all draw on model outputs of one class (their class is that class: a convex
  combination keeps a common argmax). Compiled once per bucket.

Whole mode with ``buckets_per_octave=0`` (padding only to the size divisor)
reproduces the per-image mmseg pipeline: 2 of 21 M pixels differed from the
earlier per-image runner on the benchmark split (float rounding at ties).
"""

from __future__ import annotations

import collections
import functools
import threading
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from offseg_jax.evaluation import geometry
from offseg_jax.evaluation import metrics
from offseg_jax.models import layers

DATA = P("data")
REPLICATED = P()
# Sub-stream of a window's key: view * SLOTS_PER_VIEW + slot.
SLOTS_PER_VIEW = 1 << 16


def eval_mesh(mesh: Mesh | None = None, devices: Sequence[Any] | None = None) -> Mesh:
  """A 1-D ('data',) mesh over ``devices``, the devices of ``mesh`` in its order
  (so arrays placed on a training mesh need no copy), or all devices."""
  if devices is not None:
    return Mesh(np.asarray(list(devices), dtype=object), ("data",))
  if mesh is not None:
    if tuple(mesh.axis_names) == ("data",):
      return mesh
    return Mesh(np.asarray(mesh.devices).reshape(-1), ("data",))
  return jax.make_mesh((jax.device_count(),), ("data",),
                       axis_types=(jax.sharding.AxisType.Auto,))


# Label-resolution work runs over tiles, as many as each image's label needs (a
# loop with a data-dependent trip count), so it costs what the label has,
# whatever the largest label of the batch.
TILE_ROWS = geometry.TILE_ROWS
TILE_COLS = geometry.TILE_COLS


def _taps_sum(x, taps, axis: int):
  """``sum_t x[index_t] * weight_t`` along ``axis`` of an (H, W, K) array.

  ``taps``: pairs ``(index (L,), weight (L,))``; the result has length L on
  ``axis``.
  """
  out = None
  for index, weight in taps:
    shape = [1, 1, 1]
    shape[axis] = -1
    term = jnp.take(x, index, axis=axis) * weight.reshape(shape)
    out = term if out is None else out + term
  return out


def _linear_axis_taps(i0, i1, w):
  """A bilinear axis (:func:`geometry.bilinear_taps`) as ``_taps_sum`` pairs."""
  return ((i0, 1 - w), (i1, w))


def _composed_axis_taps(j0, j1, w2, n_in: int, n_mid: int):
  """Two bilinear resizes along one axis as one 3-tap map.

  The first resize (static) takes ``n_in`` model-output rows to the ``n_mid``
  rows of the model input; the second (``j0, j1, w2``: this image's
  :func:`geometry.bilinear_taps`) takes those to the label rows. Every label
  row then reads three consecutive output rows ``base + 0..2`` (the first
  resize upsamples, so the 4 source rows of two adjacent input rows lie within
  3). Returns ``_taps_sum`` pairs.
  """
  a0, a1, w1 = layers._linear_taps(n_in, n_mid)  # pylint: disable=protected-access
  a0, a1, w1 = jnp.asarray(a0, jnp.int32), jnp.asarray(a1, jnp.int32), jnp.asarray(w1)
  terms = ((a0[j0], (1 - w2) * (1 - w1[j0])), (a1[j0], (1 - w2) * w1[j0]),
           (a0[j1], w2 * (1 - w1[j1])), (a1[j1], w2 * w1[j1]))
  base = jnp.minimum(a0[j0], a0[j1])                 # j1 = j0 - 1 on a mirrored view
  return tuple((jnp.minimum(base + offset, n_in - 1),
                sum(jnp.where(index - base == offset, weight, 0.0) for index, weight in terms))
               for offset in range(3))


def _slice_taps(taps, start, size: int):
  return tuple((jax.lax.dynamic_slice_in_dim(i, start, size),
                jax.lax.dynamic_slice_in_dim(w, start, size)) for i, w in taps)


class Engine:
  """The jitted steps of one model on one mesh; see the module docstring.

  Args:
    apply_fn: ``apply(variables, images, train=False, rngs={'ham': key}) ->
      (logits, aux)`` (a Flax ``model.apply``).
    mesh: 1-D ('data',) mesh.
    divisor: every model input side is zero-padded to a multiple of this.
    ignore_index: label value that is never counted.
  """

  def __init__(self, apply_fn: Callable, mesh: Mesh, divisor: int = 1,
               ignore_index: int = 255):
    self.apply_fn = apply_fn
    self.mesh = mesh
    self.divisor = max(int(divisor), 1)
    self.ignore_index = int(ignore_index)
    self.data = NamedSharding(mesh, DATA)
    self.replicated = NamedSharding(mesh, REPLICATED)
    self.num_devices = int(np.prod(list(mesh.shape.values())))
    self.compiles: collections.Counter = collections.Counter()
    self._lock = threading.Lock()
    self._donate = mesh.devices.flat[0].platform != "cpu"   # CPU cannot donate
    self._forward = jax.jit(self._forward_impl)
    self._windows = jax.jit(self._windows_impl, static_argnames=("window", "group", "view"))
    self._finish = jax.jit(self._finish_impl, static_argnames=("static", "with_scores"),
                           donate_argnums=(0,) if self._donate else ())

  def _count(self, key):
    with self._lock:
      self.compiles[key] += 1

  def _shard(self, body, in_specs, out_specs):
    return jax.shard_map(body, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs,
                         check_vma=False)

  @property
  def model_compiles(self) -> int:
    """Distinct compiled model forwards (one per bucket, or per slide window)."""
    return sum(n for key, n in self.compiles.items() if key[0] == "forward")

  # --- the model ----------------------------------------------------------------

  def _forward_impl(self, variables, images, hw, index, sub, key, mean, std):
    self._count(("forward", images.shape, str(images.dtype)))

    def body(variables, images, hw, index, sub, key, mean, std):
      b, n, h, w, c = images.shape
      x = images.reshape(b * n, h, w, c)
      if x.dtype == jnp.uint8:
        x = (x.astype(jnp.float32) - mean) / std
      else:
        x = x.astype(jnp.float32)
      hw = hw.reshape(b * n, 2)
      inside = ((jnp.arange(h)[None, :, None] < hw[:, 0, None, None])
                & (jnp.arange(w)[None, None, :] < hw[:, 1, None, None]))
      x = jnp.where(inside[..., None], x, 0.0)
      pad_h, pad_w = -h % self.divisor, -w % self.divisor
      if pad_h or pad_w:
        x = jnp.pad(x, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
      keys = jax.vmap(lambda i, s: jax.random.fold_in(jax.random.fold_in(key, i), s))(
          jnp.repeat(index, n), sub.reshape(-1))

      def one(image, k):
        logits, _ = self.apply_fn(variables, image[None], train=False, rngs={"ham": k})
        return logits[0].astype(jnp.float32)

      logits = jax.vmap(one)(x, keys)
      return logits.reshape((b, n) + logits.shape[1:])

    specs = (REPLICATED, DATA, DATA, DATA, DATA, REPLICATED, REPLICATED, REPLICATED)
    return self._shard(body, specs, DATA)(variables, images, hw, index, sub, key, mean, std)

  def forward(self, variables, images, hw, index, sub, key, mean, std):
    """Model logits ``(B, n, h, w, K)`` of ``(B, n, H, W, 3)`` images; see the module doc.

    ``hw`` (B, n, 2): valid size of every image (the rest is set to 0);
    ``index`` (B,): example index and ``sub`` (B, n): sub-stream, folded into
    ``key`` for each image's ``'ham'`` key; ``mean``/``std``: RGB statistics.
    """
    return self._forward(variables, images, hw, index, sub, key, mean, std)

  # --- slide windows --------------------------------------------------------------

  def _windows_impl(self, images, origins, win_hw, *, window, group, view):
    self._count(("windows", images.shape, origins.shape, window, group))
    slots = origins.shape[1]
    chunks = -(-slots // group)

    def body(images, origins, win_hw):
      ch, cw = window
      out = []
      for c in range(chunks):
        idx = [min(c * group + g, slots - 1) for g in range(group)]
        used = np.asarray([c * group + g < slots for g in range(group)])
        org = jnp.maximum(origins[:, idx], 0)                     # (b, G, 2)
        valid_hw = jnp.where(used[None, :, None] & (origins[:, idx] >= 0), win_hw[:, idx], 0)

        def cut(image, o):
          return jax.lax.dynamic_slice(image, (o[0], o[1], 0), (ch, cw, image.shape[-1]))

        crops = jax.vmap(lambda im, os: jax.vmap(lambda o: cut(im, o))(os))(images, org)
        sub = jnp.broadcast_to(
            jnp.asarray([view * SLOTS_PER_VIEW + i for i in idx], jnp.int32),
            (images.shape[0], group))
        out.append((crops, valid_hw, sub))
      return tuple(out)

    return self._shard(body, (DATA, DATA, DATA), DATA)(images, origins, win_hw)

  def windows(self, images, origins, win_hw, *, window: tuple[int, int], group: int,
              view: int):
    """The slide windows of ``(B, H, W, 3)`` images, ``group`` slots per chunk.

    Returns a tuple of ``(crops (B, group, h, w, 3), valid hw (B, group, 2),
    sub-streams (B, group))`` per chunk; unused slots (origin -1, or past the
    last slot) get a valid size of 0 (an all-padding window).
    """
    return self._windows(images, origins, win_hw, window=window, group=group, view=view)

  # --- canvases, labels and the confusion matrix ------------------------------------

  def _slide_canvas(self, chunks, origins, bucket, window):
    """Sums window logits (resized to the window) into a canvas; per-pixel count."""
    logits = jnp.concatenate(chunks, axis=1) if len(chunks) > 1 else chunks[0]
    b, slots = origins.shape[:2]
    ch, cw = window
    padded = (ch + (-ch % self.divisor), cw + (-cw % self.divisor))
    k = logits.shape[-1]
    valid = origins[..., 0] >= 0                                  # (b, S)
    org = jnp.maximum(origins, 0)

    def add(j, canvas):
      win = layers.resize_bilinear(jax.lax.dynamic_index_in_dim(logits, j, 1, False), padded)
      win = win[:, :ch, :cw]

      def one(c, wi, o, v):
        current = jax.lax.dynamic_slice(c, (o[0], o[1], 0), (ch, cw, k))
        return jax.lax.dynamic_update_slice(c, current + jnp.where(v, wi, 0.0), (o[0], o[1], 0))

      return jax.vmap(one)(canvas, win, org[:, j], valid[:, j])

    canvas = jax.lax.fori_loop(0, slots, add, jnp.zeros((b,) + tuple(bucket) + (k,), jnp.float32))
    ys, xs = jnp.arange(bucket[0]), jnp.arange(bucket[1])
    rows = ((ys[None, None] >= org[..., 0, None]) & (ys[None, None] < org[..., 0, None] + ch)
            & valid[..., None]).astype(jnp.float32)
    cols = ((xs[None, None] >= org[..., 1, None]) & (xs[None, None] < org[..., 1, None] + cw)
            ).astype(jnp.float32)
    count = jnp.einsum("bsy,bsx->byx", rows, cols)
    return jnp.where(count[..., None] > 0, canvas / jnp.maximum(count, 1.0)[..., None], 0.0)

  def _finish_impl(self, acc, views, labels, mask, label_hw, slot, *, static, with_scores):
    self._count(("finish", static, labels.shape, with_scores))
    tta = len(views) > 1 or static[0][2]
    rows, cols = TILE_ROWS, TILE_COLS
    if labels.shape[1] % rows or labels.shape[2] % cols:
      raise ValueError(f"label arrays {labels.shape[1:]} must be multiples of the "
                       f"{rows}x{cols} tiles")

    def body(acc, views, labels, mask, label_hw, slot):
      def row(x):        # this device's example ``slot``
        return jax.lax.dynamic_index_in_dim(x, slot, 0, keepdims=False)

      # Per view: the source map and its row / column taps to the label frame.
      sources = []
      for view, (bucket, window, _) in zip(views, static):
        tap = {k: row(v) for k, v in view.items() if k.startswith(("rows", "cols"))}
        if window is None:
          logits = row(view["logits"])[0]                     # (h, w, K) at the model stride
          if logits.shape[0] <= bucket[0] and logits.shape[1] <= bucket[1]:
            # mmseg resizes to the padded input, then crops and resizes to the
            # label: per axis one composed 3-tap map, no input-sized canvas.
            source = logits
            row_taps = _composed_axis_taps(tap["rows_i0"], tap["rows_i1"], tap["rows_w"],
                                           logits.shape[0], bucket[0])
            col_taps = _composed_axis_taps(tap["cols_i0"], tap["cols_i1"], tap["cols_w"],
                                           logits.shape[1], bucket[1])
          else:                                               # a model that upsamples
            source = layers.resize_bilinear(logits[None], bucket)[0]
            row_taps = _linear_axis_taps(tap["rows_i0"], tap["rows_i1"], tap["rows_w"])
            col_taps = _linear_axis_taps(tap["cols_i0"], tap["cols_i1"], tap["cols_w"])
        else:
          chunks = tuple(row(c)[None] for c in view["logits"])
          source = self._slide_canvas(chunks, row(view["origins"])[None], bucket, window)[0]
          row_taps = _linear_axis_taps(tap["rows_i0"], tap["rows_i1"], tap["rows_w"])
          col_taps = _linear_axis_taps(tap["cols_i0"], tap["cols_i1"], tap["cols_w"])
        sources.append((source, row_taps, col_taps))

      label, valid = row(labels), row(mask)
      height, width = row(label_hw)[0], row(label_hw)[1]
      k = sources[0][0].shape[-1]
      hl, wl = labels.shape[1:]
      pred = jnp.zeros((hl, wl), jnp.int32)
      scores = jnp.zeros((hl, wl, k), jnp.float32) if with_scores else None
      confusion = jnp.zeros((k, k), jnp.int32)
      # Shortcut (one whole-mode view, labels only): a label pixel is a convex
      # combination of the 3x3 model-output pixels from its taps' base, so if
      # all nine have the same argmax, so has the pixel. Tiles made only of
      # such pixels take the class from the argmax at the model's stride and
      # skip the per-class work at label resolution.
      shortcut = (len(sources) == 1 and not tta and not with_scores and static[0][1] is None
                  and len(sources[0][1]) == 3)
      if shortcut:
        source, row_taps, col_taps = sources[0]
        coarse = jnp.argmax(source, axis=-1).astype(jnp.int32)          # (h, w)
        h_src, w_src = coarse.shape
        near_r = jnp.minimum(jnp.arange(h_src)[:, None] + jnp.arange(3), h_src - 1)
        near_c = jnp.minimum(jnp.arange(w_src)[:, None] + jnp.arange(3), w_src - 1)
        block = coarse[near_r][:, :, near_c]                            # (h, 3, w, 3)
        uniform = jnp.all(block == coarse[:, None, :, None], axis=(1, 3))
        row_base, col_base = row_taps[0][0], col_taps[0][0]
        inside_cols = jnp.arange(wl) < width
        easy_cols = uniform[:, col_base] | ~inside_cols[None]            # (h, wl)

      def strip(s, carry):
        y0 = s * rows
        n_tiles = (width + cols - 1) // cols
        if shortcut:
          rb = jax.lax.dynamic_slice_in_dim(row_base, y0, rows)
          inside_rows = (y0 + jnp.arange(rows)) < height
          easy = jnp.all(easy_cols[rb] | ~inside_rows[:, None], axis=0)   # (wl,)
          tile_easy = jnp.all(easy.reshape(wl // cols, cols), axis=1)
          hard = jnp.any(~tile_easy & (jnp.arange(wl // cols) < n_tiles))
          w_src = sources[0][0].shape[1]
          partial = [jax.lax.cond(
              hard, lambda: _taps_sum(sources[0][0], _slice_taps(sources[0][1], y0, rows), 0),
              lambda: jnp.zeros((rows, w_src, k), jnp.float32))]
        else:
          partial = [_taps_sum(source, _slice_taps(rt, y0, rows), 0)    # (rows, w_src, K)
                     for source, rt, _ in sources]

        def exact(x0):
          total = None
          for part, (_, _, ct) in zip(partial, sources):
            out = _taps_sum(part, _slice_taps(ct, x0, cols), 1)        # (rows, cols, K)
            if tta:
              out = jax.nn.softmax(out, axis=-1)
            total = out if total is None else total + out
          return jnp.argmax(total, axis=-1).astype(jnp.int32), total

        def tile(t, carry):
          confusion, pred, scores = carry
          x0 = t * cols
          if shortcut:
            cb = jax.lax.dynamic_slice_in_dim(col_base, x0, cols)
            p = jax.lax.cond(tile_easy[t], lambda: coarse[rb][:, cb], lambda: exact(x0)[0])
          else:
            p, total = exact(x0)
          labels_tile = jax.lax.dynamic_slice(label, (y0, x0), (rows, cols))
          confusion = confusion + metrics.confusion_matrix(p, labels_tile, k, self.ignore_index,
                                                           valid=valid)
          pred = jax.lax.dynamic_update_slice(pred, p, (y0, x0))
          if scores is not None:
            scores = jax.lax.dynamic_update_slice(scores, total / len(sources), (y0, x0, 0))
          return confusion, pred, scores

        return jax.lax.fori_loop(0, n_tiles, tile, carry)

      confusion, pred, scores = jax.lax.fori_loop(
          0, (height + rows - 1) // rows, strip, (confusion, pred, scores))
      out = (acc + confusion[None], pred[None])
      if with_scores:
        out += (scores[None],)
      return out

    out_specs = (DATA, DATA, DATA) if with_scores else (DATA, DATA)
    # The slot index is a traced scalar: one compile serves every slot.
    return self._shard(body, (DATA, DATA, DATA, DATA, DATA, REPLICATED), out_specs)(
        acc, views, labels, mask, label_hw, slot)

  def finish(self, acc, views: Sequence[dict], labels, mask, label_hw, slot, *,
             static: tuple, with_scores: bool = False):
    """Adds one slot's confusion to ``acc``; returns ``(acc, pred[, scores])``.

    Slot ``slot`` of every device (one image per device) is finished: its
    logits resized to the label frame, argmax, confusion matrix, over tiles of
    :data:`TILE_ROWS` x :data:`TILE_COLS` label pixels, as many as each
    image's label needs. The compiled step depends on the bucket and the
    label array shape (fixed per bucket), not on the image.

    Args:
      acc: (D, K, K) int32 per-device confusion accumulator.
      views: per view, ``{'logits': (B, 1, h, w, K)}`` (whole) or a tuple of
        chunk logits plus ``'origins'`` (B, S, 2) (slide), and the label taps
        ``'rows_i0' 'rows_i1' 'rows_w'`` (B, HL) and ``'cols_*'`` (B, WL).
      labels: (B, HL, WL) uint8 labels (255 = ignore and padding), HL and WL
        multiples of the tile.
      mask: (B,) valid examples.
      label_hw: (B, 2) int32 label sizes.
      slot: replicated int32 scalar, the slot within each device's rows.
      static: per view ``(bucket, window or None, is_tta)``.
      with_scores: also return the per-pixel scores (logits, or for TTA the
        mean probabilities).

    Returns:
      ``acc``, ``pred`` (D, HL, WL) int32 and optionally ``scores`` (D, HL, WL,
      K); pixels outside each label's size are 0.
    """
    return self._finish(acc, tuple(views), labels, mask, label_hw, slot, static=static,
                        with_scores=with_scores)

  def zeros(self, num_classes: int):
    """A fresh (D, K, K) int32 accumulator, sharded over the devices."""
    return _zeros(self.data, self.num_devices, int(num_classes))


@functools.lru_cache(maxsize=None)
def _zeros_fn(sharding, shape):
  return jax.jit(lambda: jnp.zeros(shape, jnp.int32), out_shardings=sharding)


def _zeros(sharding, devices: int, k: int):
  return _zeros_fn(sharding, (devices, k, k))()


_ENGINES: "collections.OrderedDict[tuple, Engine]" = collections.OrderedDict()
_ENGINES_LOCK = threading.Lock()
_MAX_ENGINES = 8


def get_engine(apply_fn: Callable, mesh: Mesh, divisor: int = 1,
               ignore_index: int = 255) -> Engine:
  """The engine of a model on a mesh, shared so that every evaluator of the same
  model (e.g. one per evaluation during training) reuses its compiled steps."""
  key = (apply_fn, mesh, int(divisor), int(ignore_index))
  with _ENGINES_LOCK:
    engine = _ENGINES.get(key)
    if engine is None:
      engine = Engine(apply_fn, mesh, divisor, ignore_index)
      _ENGINES[key] = engine
      while len(_ENGINES) > _MAX_ENGINES:
        _ENGINES.popitem(last=False)
    else:
      _ENGINES.move_to_end(key)
    return engine
