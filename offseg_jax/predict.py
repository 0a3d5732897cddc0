r"""Segment images with a checkpoint (mmseg's ``demo/image_demo.py``, batched and jitted).

  python -m offseg_jax.predict --checkpoint=/tmp/offseg_default \
      --input=IMAGE_OR_DIR --output=OUT [--opacity=0.5] [--tta] [--mode=slide] \
      [--config=experiments/configs/default.py]

A training checkpoint carries its config (``--config`` is optional and must
agree with it on the model and dataset); converted checkpoints need
``--config``. Images of any size work with every model: each is padded to the
model's size divisor and the prediction cropped back.

For every image (a file, or every image under a folder, recursively) it writes,
keeping the input's relative path and stem (``--input`` and ``--output`` may be
local or ``gs://`` paths: every file goes through ``etils.epath``):

* ``OUT/palette/<stem>.png``: the prediction as a palette PNG (class colours);
* ``OUT/overlay/<stem>.png``: the colours blended over the image
  (``image * (1 - opacity) + colour * opacity``);
* ``OUT/raw/<stem>.png``: single-channel labels in the dataset's own convention
  (class + 1 for reduce_zero_label datasets such as ADE20K, as benchmark servers
  expect); ``evaluate --predictions=OUT/raw`` scores them.

The image goes through the config's test pipeline (resize, normalisation,
whole/slide inference, optional TTA) in the evaluator's batched steps (images
of similar size share a bucket and a compiled step; every device of every
process takes a share); the prediction has the image's original size.
"""

from __future__ import annotations

import io
import sys
from typing import Sequence

import cv2
from etils import epath
import jax
import numpy as np
from absl import flags, logging
from PIL import Image
from tqdm import tqdm

from input_pipeline import storage
from offseg_jax import checkpointing, cli, distributed
from offseg_jax.evaluation import evaluator as evaluator_lib
from offseg_jax.evaluation import report

FLAGS = flags.FLAGS

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def list_images(path: str | epath.PathLike) -> list[tuple[epath.Path, epath.Path]]:
  """``(file, relative path)`` of an image file or of every image under a folder."""
  path = epath.Path(path)
  if path.is_file():
    return [(path, epath.Path(path.name))]
  if not path.is_dir():
    raise FileNotFoundError(f"--input {path} is neither an image file nor a folder")
  files = sorted((directory / f, epath.Path(rel + f))
                 for directory, rel, names in storage.walk(path) for f in names
                 if epath.Path(f).suffix.lower() in IMAGE_SUFFIXES)
  if not files:
    raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {path}")
  return files


class UnreadableImageError(ValueError):
  """An input file that is not a readable image (the message names it)."""


def read_image(path: str | epath.PathLike):
  """An image file as HxWx3 uint8 RGB; unreadable files raise naming the file."""
  file = epath.Path(path)
  data = np.frombuffer(file.read_bytes(), np.uint8) if file.is_file() else None
  image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data is not None and data.size else None
  if image is None:
    raise UnreadableImageError(f"cannot read image file {path}: not an image, or corrupt")
  return np.ascontiguousarray(image[:, :, ::-1])


# EXIF orientations that swap width and height (cv2 applies them when decoding).
_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)


class ImageFiles:
  """Image files as an evaluator source: ``load(i)`` decodes file ``i`` (no
  label), ``example_size(i)`` reads its size from the header."""

  def __init__(self, files: Sequence[tuple[epath.Path, epath.Path]]):
    self.files = list(files)

  def __len__(self) -> int:
    return len(self.files)

  def example_size(self, index: int) -> tuple[int, int]:
    """(H, W) of the decoded image, from the header (EXIF rotation included)."""
    path = self.files[index][0]
    try:
      with epath.Path(path).open("rb") as f, Image.open(f) as image:
        width, height = image.size
        orientation = image.getexif().get(0x0112, 1)
    except (OSError, SyntaxError, ValueError) as e:
      raise UnreadableImageError(f"cannot read image file {path}: not an image, or "
                                 f"corrupt ({e})") from e
    if orientation in _TRANSPOSING_ORIENTATIONS:
      width, height = height, width
    return int(height), int(width)

  def load(self, index: int) -> dict:
    path, rel = self.files[index]
    return {"image": read_image(path), "label": None, "name": rel.stem, "path": path,
            "rel": rel}


def raw_labels(pred, reduce_zero_label: bool):
  """Class indices -> the dataset's label convention as uint8."""
  raw = np.asarray(pred).astype(np.int64) + (1 if reduce_zero_label else 0)
  if raw.max(initial=0) > 255:
    raise ValueError("more classes than an 8-bit label PNG can hold")
  return raw.astype(np.uint8)


def _write_png(image: Image.Image, path: epath.Path) -> None:
  """``image.save(path)`` through epath: encoded in memory, written as bytes."""
  buffer = io.BytesIO()
  image.save(buffer, format="PNG")
  path.write_bytes(buffer.getvalue())


def write_outputs(out_dir, rel, image, pred, palette, reduce_zero_label: bool,
                  opacity: float) -> dict[str, epath.Path]:
  """Writes the palette, overlay and raw PNGs of one image."""
  stem = epath.Path(rel).with_suffix(".png")
  paths = {kind: epath.Path(out_dir) / kind / stem for kind in ("palette", "overlay", "raw")}
  for p in paths.values():
    p.parent.mkdir(parents=True, exist_ok=True)
  palette = np.asarray(palette, np.uint8)
  indexed = Image.fromarray(np.asarray(pred).astype(np.uint8))   # 'L', becomes 'P' below
  indexed.putpalette(palette.reshape(-1).tolist())
  _write_png(indexed, paths["palette"])
  _write_png(Image.fromarray(report.overlay(image, pred, palette, opacity)), paths["overlay"])
  _write_png(Image.fromarray(raw_labels(pred, reduce_zero_label)), paths["raw"])
  return paths


def run(config, checkpoint: str, inputs: str | epath.PathLike, output: str | epath.PathLike,
        *, opacity: float = 0.5, mode: str | None = None, tta: bool | None = None,
        which: str = "latest", progress: bool = True) -> list[dict[str, epath.Path]]:
  """Predicts every image of ``inputs`` (this process's share); returns the
  written paths per image, in input order. ``config`` may be None for a
  training checkpoint (its own config is used)."""
  if not 0.0 <= opacity <= 1.0:
    raise ValueError(f"--opacity must be in [0, 1], got {opacity}")
  files = list_images(inputs)
  config, model, variables, info = evaluator_lib.load_for_eval(checkpoint, config, which=which)
  evaluator = evaluator_lib.Evaluator(model, config, mode=mode, tta=tta)
  out_dir = epath.Path(output)
  written: dict[int, dict[str, epath.Path]] = {}
  bar = tqdm(total=len(files), unit="img",
             disable=not progress or len(files) == 1 or jax.process_index() != 0)

  def save(index, example, pred):
    written[index] = write_outputs(out_dir, example["rel"], example["image"], pred,
                                   info.palette, info.reduce_zero_label, opacity)
    bar.update(1)

  evaluator.predict(variables, ImageFiles(files), save)
  bar.close()
  return [written[i] for i in sorted(written)]


def define_flags():
  """The flags of ``python -m offseg_jax.predict``, defined when it runs."""
  cli.define_checkpoint_flags()
  flags.DEFINE_string("input", None, "An image file or a folder of images.")
  flags.DEFINE_string("output", None, "Output folder.")
  flags.DEFINE_float("opacity", 0.5, "Opacity of the colours in the overlay, in [0, 1].")


def main(argv: Sequence[str]):
  cli.positional(argv)
  logging.set_verbosity(logging.WARNING)
  distributed.initialize_from_flags()
  try:
    written = run(FLAGS.config, FLAGS.checkpoint, FLAGS.input, FLAGS.output,
                  opacity=FLAGS.opacity, mode=FLAGS.mode, tta=FLAGS.tta, which=FLAGS.which)
  except (checkpointing.ConfigMismatchError, UnreadableImageError, FileNotFoundError) as e:
    sys.exit(f"predict: {e}")               # a user error with a one-line explanation
  print(f"wrote {len(written)} predictions to {FLAGS.output} (palette/, overlay/, raw/)")


if __name__ == "__main__":
  define_flags()
  flags.mark_flags_as_required(["checkpoint", "input", "output"])
  cli.run(main)
