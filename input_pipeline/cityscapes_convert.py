"""Writes Cityscapes ``*_gtFine_labelTrainIds.png`` next to ``*_gtFine_labelIds.png``.

  python -m input_pipeline.cityscapes_convert data/cityscapes [--nproc 8]

Maps the 34 Cityscapes label ids to the 19 training ids (``classes.
CITYSCAPES_ID_TO_TRAIN_ID``) and every other value to 255 (ignored). The
labelIds PNGs ship with gtFine and are rendered from the same polygons as the
official converter's output, so mapping them pixel by pixel gives the same
trainIds images without the cityscapesscripts dependency.
"""

from __future__ import annotations

import multiprocessing

from absl import app
from absl import flags
from etils import epath
import numpy as np

from input_pipeline import command_line
from input_pipeline import classes
from input_pipeline import image_io
from input_pipeline import storage

_LABEL_IDS_SUFFIX = "_gtFine_labelIds.png"
_TRAIN_IDS_SUFFIX = "_gtFine_labelTrainIds.png"


def train_id_lut() -> np.ndarray:
  """256-entry uint8 table: label id -> train id, 255 for everything else."""
  lut = np.full(256, classes.IGNORE_INDEX, np.uint8)
  for label_id, train_id in classes.CITYSCAPES_ID_TO_TRAIN_ID.items():
    lut[label_id] = train_id
  return lut


def find_label_id_files(root: str) -> list[str]:
  """All ``*_gtFine_labelIds.png`` under ``root/gtFine`` (sorted)."""
  gt_dir = storage.join(root, "gtFine")
  if not epath.Path(gt_dir).is_dir():
    raise FileNotFoundError(f"{gt_dir} not found; expected the Cityscapes root holding "
                            "gtFine/{train,val,test}/<city>/*" + _LABEL_IDS_SUFFIX)
  found = [storage.join(directory, f) for directory, _, filenames in storage.walk(gt_dir)
           for f in filenames if f.endswith(_LABEL_IDS_SUFFIX)]
  if not found:
    raise FileNotFoundError(f"no *{_LABEL_IDS_SUFFIX} files under {gt_dir}")
  return sorted(found)


def convert_file(path: str) -> int:
  """Converts one file; returns its number of pixels with ids above 33 (unknown)."""
  label_ids = image_io.decode_label(image_io.read_bytes(path), path)
  train_ids = train_id_lut()[label_ids]
  out = path[:-len(_LABEL_IDS_SUFFIX)] + _TRAIN_IDS_SUFFIX
  image_io.write_image(out, train_ids)     # OSError "<out>: cannot write" on failure
  return int((label_ids > 33).sum())


def convert(root: str, nproc: int = 1, log=print) -> int:
  """Converts every labelIds file under ``root``; returns the number converted."""
  files = find_label_id_files(root)
  if nproc > 1:
    with multiprocessing.Pool(nproc) as pool:
      unknown = pool.map(convert_file, files, chunksize=8)
  else:
    unknown = [convert_file(f) for f in files]
  log(f"wrote {len(files)} *{_TRAIN_IDS_SUFFIX} files under {storage.join(root, 'gtFine')}")
  odd = [f for f, n in zip(files, unknown) if n]
  if odd:
    log(f"warning: {len(odd)} files had ids above 33 (written as 255), e.g. {odd[0]}")
  return len(files)


def main(argv):
  if len(argv) != 2:
    raise app.UsageError("usage: python -m input_pipeline.cityscapes_convert ROOT [--nproc N]")
  convert(argv[1], flags.FLAGS.nproc)


if __name__ == "__main__":
  flags.DEFINE_integer("nproc", 1, "Worker processes.")
  command_line.run(main)
