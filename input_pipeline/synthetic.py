"""The embedded default dataset: synthetic textured scenes, generated on the fly.

Each example is a deterministic function of ``(seed, split, index)``, so the
dataset needs no download, splits are fixed, and any process can produce any
example (a grain random-access source like every real dataset here).

Design (why it is a fair test of Offset Learning, not a toy):
  * 9 classes: a smooth background and 8 object classes, each defined by a
    *texture* (stripe orientation, checker, dots, speckle, rings, grid) with its
    own period range and a preferred *shape* (rectangles, ellipses, triangles,
    blobs), at random size, position and rotation;
  * 2-5 objects per image, painted in random order, so later objects occlude
    earlier ones;
  * a per-image appearance shift: every class draws its two texture colours anew
    in every image (plus a global gain and pixel noise), so the same class looks
    different across images. Colour alone carries no class information: a
    per-pixel colour classifier (a 1x1-conv-only model) stays far below 0.5 mIoU
    (``tests/test_synthetic.py`` trains one), while a model that reads local
    texture can approach 1.0.
"""

from __future__ import annotations

import dataclasses

import numpy as np

CLASS_NAMES = ("background", "h_stripes", "v_stripes", "diagonal", "checker",
               "dots", "speckle", "rings", "grid")
PALETTE = np.array([[0, 0, 0], [230, 25, 75], [60, 180, 75], [255, 225, 25],
                    [0, 130, 200], [245, 130, 48], [145, 30, 180], [70, 240, 240],
                    [240, 50, 230]], dtype=np.uint8)
NUM_CLASSES = len(CLASS_NAMES)
SPLITS = {"train": 0, "val": 1, "test": 2}

# Preferred shape of each object class (used 70 % of the time) and the texture
# period range in pixels at a 64-pixel image (scaled with the image size).
_SHAPES = ("rect", "ellipse", "triangle", "blob")
_PREFERRED_SHAPE = {1: "rect", 2: "ellipse", 3: "triangle", 4: "rect", 5: "ellipse",
                    6: "blob", 7: "ellipse", 8: "triangle"}
_PERIOD = {1: (5.0, 7.0), 2: (5.0, 7.0), 3: (5.5, 7.5), 4: (6.0, 8.0), 5: (6.0, 8.0),
           6: (2.0, 2.0), 7: (5.5, 7.0), 8: (7.0, 9.0)}


@dataclasses.dataclass(frozen=True)
class SyntheticSource:
  """Random-access source of ``{'image', 'label', 'name'}`` synthetic examples.

  Attributes:
    split: 'train', 'val' or 'test' (disjoint random streams).
    num_examples: length of the split.
    image_size: square image side in pixels.
    seed: dataset seed; the same seed always gives the same dataset.
  """
  split: str = "train"
  num_examples: int = 4096
  image_size: int = 64
  seed: int = 0

  def __post_init__(self):
    if self.split not in SPLITS:
      raise ValueError(f"Unknown synthetic split {self.split!r}; choose from {sorted(SPLITS)}")
    if self.image_size < 16:
      raise ValueError(f"synthetic image_size must be >= 16, got {self.image_size}")

  def __len__(self) -> int:
    return self.num_examples

  def __getitem__(self, index: int) -> dict:
    index = int(index)
    if not 0 <= index < self.num_examples:
      raise IndexError(f"synthetic {self.split} index {index} out of range [0, {self.num_examples})")
    rng = np.random.default_rng([self.seed, SPLITS[self.split], index])
    image, label = render_scene(rng, self.image_size)
    return {"image": image, "label": label, "name": f"synthetic_{self.split}_{index:06d}"}

  def __repr__(self):
    return (f"SyntheticSource(split={self.split!r}, num_examples={self.num_examples}, "
            f"image_size={self.image_size}, seed={self.seed})")


def _random_colour_pair(rng: np.random.Generator):
  """Two colours far enough apart for the texture to be visible."""
  while True:
    c1, c2 = rng.uniform(0, 255, size=(2, 3))
    if np.abs(c1 - c2).max() > 80:
      return c1, c2


def _shape_mask(rng, kind: str, yy, xx, cy, cx, radius):
  angle = rng.uniform(0, np.pi)
  dy, dx = yy - cy, xx - cx
  u = dx * np.cos(angle) + dy * np.sin(angle)
  v = -dx * np.sin(angle) + dy * np.cos(angle)
  aspect = rng.uniform(0.6, 1.0)
  if kind == "rect":
    return (np.abs(u) <= radius) & (np.abs(v) <= radius * aspect)
  if kind == "ellipse":
    return (u / radius) ** 2 + (v / (radius * aspect)) ** 2 <= 1.0
  if kind == "triangle":
    # Equilateral-ish triangle: three half-planes around the centre.
    inside = np.ones_like(u, dtype=bool)
    for k in range(3):
      t = 2 * np.pi * k / 3
      inside &= (u * np.cos(t) + v * np.sin(t)) <= radius * 0.55
    return inside
  # Blob: a circle with a random low-frequency radial perturbation.
  theta = np.arctan2(v, u)
  r = np.sqrt(u ** 2 + v ** 2)
  bumps = sum(rng.uniform(0.05, 0.18) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
              for k in (2, 3, 5))
  return r <= radius * (0.85 + bumps)


def _texture(rng, cls: int, yy, xx, size: int, cy: float, cx: float):
  """Texture value in [0, 1] of class ``cls`` over the whole image grid."""
  lo, hi = _PERIOD[cls]
  period = rng.uniform(lo, hi) * max(size / 64.0, 1.0)
  phase = rng.uniform(0, 2 * np.pi)
  w = 2 * np.pi / period
  if cls == 1:                                     # horizontal stripes
    return 0.5 + 0.5 * np.sign(np.sin(w * yy + phase))
  if cls == 2:                                     # vertical stripes
    return 0.5 + 0.5 * np.sign(np.sin(w * xx + phase))
  if cls == 3:                                     # diagonal stripes (either diagonal)
    s = 1.0 if rng.random() < 0.5 else -1.0
    return 0.5 + 0.5 * np.sign(np.sin(w * (xx + s * yy) / np.sqrt(2) + phase))
  if cls == 4:                                     # checkerboard
    return 0.5 + 0.5 * np.sign(np.sin(w * xx + phase) * np.sin(w * yy + phase))
  if cls == 5:                                     # dots on a lattice
    fy = np.mod(yy + phase, period) - period / 2
    fx = np.mod(xx + phase, period) - period / 2
    return (fy ** 2 + fx ** 2 <= (period * 0.3) ** 2).astype(np.float64)
  if cls == 6:                                     # speckle: noise in 2x2 cells
    cells = (rng.random(((yy.shape[0] + 1) // 2, (yy.shape[1] + 1) // 2)) < 0.5)
    return np.repeat(np.repeat(cells, 2, 0), 2, 1)[:yy.shape[0], :yy.shape[1]].astype(np.float64)
  if cls == 7:                                     # concentric rings
    r = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
    return 0.5 + 0.5 * np.sign(np.sin(w * r + phase))
  # grid of thin lines
  fy = np.mod(yy + phase, period)
  fx = np.mod(xx + phase, period)
  return ((fy < 1.2) | (fx < 1.2)).astype(np.float64)


def render_scene(rng: np.random.Generator, size: int):
  """Draws one ``(image uint8 [S,S,3], label uint8 [S,S])`` scene from ``rng``."""
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
  # Background: a smooth two-colour gradient in a random direction.
  c1, c2 = _random_colour_pair(rng)
  t = rng.uniform(0, 2 * np.pi)
  ramp = (np.cos(t) * xx + np.sin(t) * yy) / size
  ramp = (ramp - ramp.min()) / max(ramp.max() - ramp.min(), 1e-6)
  image = c1 * (1 - ramp[..., None]) + c2 * ramp[..., None]
  label = np.zeros((size, size), np.uint8)

  # Per-image appearance of every class (the misalignment Offset Learning targets).
  colours = {c: _random_colour_pair(rng) for c in range(1, NUM_CLASSES)}
  for _ in range(int(rng.integers(2, 6))):
    cls = int(rng.integers(1, NUM_CLASSES))
    shape = _PREFERRED_SHAPE[cls] if rng.random() < 0.7 else _SHAPES[rng.integers(len(_SHAPES))]
    radius = rng.uniform(0.20, 0.36) * size
    cy, cx = rng.uniform(0.1, 0.9, size=2) * size
    mask = _shape_mask(rng, shape, yy, xx, cy, cx, radius)
    if mask.sum() < 0.01 * size * size:
      continue
    tex = _texture(rng, cls, yy, xx, size, cy, cx)
    a, b = colours[cls]
    paint = a * (1 - tex[..., None]) + b * tex[..., None]
    image[mask] = paint[mask]
    label[mask] = cls

  gain = rng.uniform(0.8, 1.2)
  image = image * gain + rng.normal(0, 6.0, image.shape)
  return np.clip(np.rint(image), 0, 255).astype(np.uint8), label
