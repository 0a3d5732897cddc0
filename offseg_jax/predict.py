r"""Segment images with a checkpoint (mmseg's ``demo/image_demo.py``, jitted).

  python -m offseg_jax.predict --config=experiments/configs/default.py \
      --checkpoint=/tmp/offseg_default --input=IMAGE_OR_DIR --output=OUT \
      [--opacity=0.5] [--tta] [--mode=slide]

For every image (a file, or every image under a folder, recursively) it writes,
keeping the input's relative path and stem:

* ``OUT/palette/<stem>.png``: the prediction as a palette PNG (class colours);
* ``OUT/overlay/<stem>.png``: the colours blended over the image
  (``image * (1 - opacity) + colour * opacity``);
* ``OUT/raw/<stem>.png``: single-channel labels in the dataset's own convention
  (class + 1 for reduce_zero_label datasets such as ADE20K, as benchmark servers
  expect); ``evaluate --predictions=OUT/raw`` scores them.

The image goes through the config's test pipeline (resize, normalisation,
whole/slide inference, optional TTA); the prediction has the image's original
size.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags
from PIL import Image
from tqdm import tqdm

from input_pipeline import transforms
from offseg_jax.evaluation import inference, report, runner

FLAGS = flags.FLAGS

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def list_images(path: str | Path) -> list[tuple[Path, Path]]:
  """``(file, relative path)`` of an image file or of every image under a folder."""
  path = Path(path)
  if path.is_file():
    return [(path, Path(path.name))]
  if not path.is_dir():
    raise FileNotFoundError(f"--input {path} is neither an image file nor a folder")
  files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
  if not files:
    raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {path}")
  return [(p, p.relative_to(path)) for p in files]


def read_image(path: str | Path):
  """An image file as HxWx3 uint8 RGB; unreadable files raise naming the file."""
  data = np.fromfile(str(path), np.uint8) if Path(path).is_file() else None
  image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data is not None and data.size else None
  if image is None:
    raise ValueError(f"cannot read image file {path}: not an image, or corrupt")
  return np.ascontiguousarray(image[:, :, ::-1])


def raw_labels(pred, reduce_zero_label: bool):
  """Class indices -> the dataset's label convention as uint8."""
  raw = np.asarray(pred).astype(np.int64) + (1 if reduce_zero_label else 0)
  if raw.max(initial=0) > 255:
    raise ValueError("more classes than an 8-bit label PNG can hold")
  return raw.astype(np.uint8)


def write_outputs(out_dir: Path, rel: Path, image, pred, palette, reduce_zero_label: bool,
                  opacity: float) -> dict[str, Path]:
  """Writes the palette, overlay and raw PNGs of one image."""
  stem = rel.with_suffix(".png")
  paths = {kind: out_dir / kind / stem for kind in ("palette", "overlay", "raw")}
  for p in paths.values():
    p.parent.mkdir(parents=True, exist_ok=True)
  palette = np.asarray(palette, np.uint8)
  indexed = Image.fromarray(np.asarray(pred).astype(np.uint8))   # 'L', becomes 'P' below
  indexed.putpalette(palette.reshape(-1).tolist())
  indexed.save(paths["palette"])
  Image.fromarray(report.overlay(image, pred, palette, opacity)).save(paths["overlay"])
  Image.fromarray(raw_labels(pred, reduce_zero_label)).save(paths["raw"])
  return paths


def run(config, checkpoint: str, inputs: str | Path, output: str | Path, *,
        opacity: float = 0.5, mode: str | None = None, tta: bool | None = None,
        which: str = "latest", progress: bool = True) -> list[dict[str, Path]]:
  """Predicts every image of ``inputs``; returns the written paths per image."""
  if not 0.0 <= opacity <= 1.0:
    raise ValueError(f"--opacity must be in [0, 1], got {opacity}")
  files = list_images(inputs)
  model, variables, info = runner.load_model(config, checkpoint, which=which)
  settings = inference.InferenceSettings.from_config(config.eval, mode=mode, tta=tta)
  segmenter = inference.Segmenter(model, variables, settings, mean=config.data.mean,
                                  std=config.data.std, seed=int(config.get("seed", 0)))
  transform = transforms.build_eval_transform(config.data)
  out_dir = Path(output)
  written = []
  bar = tqdm(files, unit="img", disable=not progress or len(files) == 1)
  for path, rel in bar:
    image = read_image(path)
    if settings.tta:
      pred = segmenter.predict(image)
    else:
      # The test transform resizes the image; a placeholder label keeps the
      # example complete (its original size is the output size).
      example = transform({"image": image, "name": rel.stem,
                           "label": np.zeros(image.shape[:2], np.uint8)})
      pred = segmenter.predict(np.asarray(example["image"]), image.shape[:2])
    written.append(write_outputs(out_dir, rel, image, pred, info.palette,
                                 info.reduce_zero_label, opacity))
  return written


def define_flags():
  """Command-line flags; defined only when run as a program, so the tools
  can be imported together (they share flag names)."""
  config_flags.DEFINE_config_file("config", None, "Experiment config file[:arg].",
                                  lock_config=True)
  flags.DEFINE_string("checkpoint", None, "Workdir, step directory or converted checkpoint.")
  flags.DEFINE_string("input", None, "An image file or a folder of images.")
  flags.DEFINE_string("output", None, "Output folder.")
  flags.DEFINE_float("opacity", 0.5, "Opacity of the colours in the overlay, in [0, 1].")
  flags.DEFINE_enum("mode", None, ["whole", "slide"], "Override config.eval.mode.")
  flags.DEFINE_bool("tta", None, "Multi-scale + flip test-time augmentation.")
  flags.DEFINE_enum("which", "latest", ["latest", "best"], "Step of a training workdir.")


def main(argv: Sequence[str]):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  written = run(FLAGS.config, FLAGS.checkpoint, FLAGS.input, FLAGS.output,
                opacity=FLAGS.opacity, mode=FLAGS.mode, tta=FLAGS.tta, which=FLAGS.which)
  print(f"wrote {len(written)} predictions to {FLAGS.output} (palette/, overlay/, raw/)")


if __name__ == "__main__":
  define_flags()
  flags.mark_flags_as_required(["config", "checkpoint", "input", "output"])
  app.run(main)
