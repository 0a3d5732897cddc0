r"""Evaluate a checkpoint (or a folder of predictions) on a dataset split.

mmseg's ``tools/test.py``, batched, jitted and sharded over every device::

  python -m offseg_jax.evaluate --checkpoint=/tmp/offseg_default \
      [--tta] [--mode=slide] [--output=DIR]
  python -m offseg_jax.evaluate --config=experiments/configs/default.py \
      --checkpoint=/tmp/offseg_default [--config.eval.batch_size=4]

``--checkpoint`` takes a training workdir (latest step, or ``--which=best``), a
step directory (restored onto however many devices this run has) or a converted
official checkpoint. A training checkpoint carries its config: without
``--config`` it is used; a ``--config`` that disagrees with it on the model,
classifier, number of classes or dataset is refused with a message naming the
fields (evaluation settings such as ``eval.mode`` may differ). Converted
checkpoints need ``--config``. ``--predictions=DIR`` scores label PNGs instead
of running a model (``DIR/<name>.png`` per example, in the dataset's label
convention, e.g. ``predict``'s ``raw/`` folder; needs ``--config``).

Prints the per-class table and writes to ``--output`` (default: ``WORKDIR/eval``
for a training checkpoint, else the directory holding the checkpoint): ``metrics.json`` (percent; per-class by
class name; null = class absent from ground truth and prediction),
``confusion.npy`` (int64, rows = ground truth), ``confusion.png`` and
``report.md`` with per-class IoU, confusion, sample overlays and training
curves (when the workdir has TensorBoard events).

Every image is scored exactly once on any number of processes: run the same
command on every host (``--coordinator_address`` etc., or a detected cluster).
"""

from __future__ import annotations

import sys
from typing import Any

from etils import epath
import jax
import numpy as np
from absl import flags, logging

from input_pipeline import datasets, image_io, storage
from offseg_jax import checkpointing, cli, distributed
from offseg_jax.evaluation import evaluator as evaluator_lib
from offseg_jax.evaluation import geometry
from offseg_jax.evaluation import report as report_lib
from offseg_jax.evaluation import runner

FLAGS = flags.FLAGS


def default_output_dir(checkpoint: str | None, predictions: str | None = None
                       ) -> epath.Path:
  """The workdir of a training checkpoint, else the checkpoint's directory.

  For ``--predictions DIR`` it is ``DIR/../eval`` (next to ``predict``'s
  ``raw/`` folder) so results never mix with the PNGs being scored. Local
  paths are made absolute; ``gs://`` ones stay as they are.
  """
  if predictions:
    return storage.absolute(predictions).parent / "eval"
  path = storage.absolute(checkpoint)
  # Inside a training workdir results go to WORKDIR/eval, never over the
  # trainer's own metrics.json.
  if (path / "checkpoints").is_dir():
    return path / "eval"                         # a workdir
  if path.name == "checkpoints":
    return path.parent / "eval"
  if path.parent.name == "checkpoints" and path.name.isdigit():
    return path.parent.parent / "eval"           # WORKDIR/checkpoints/<step>
  return path if path.is_dir() else path.parent


def _workdir_of(checkpoint: str | None) -> epath.Path | None:
  if not checkpoint:
    return None
  out = default_output_dir(checkpoint)
  workdir = out.parent if out.name == "eval" else out
  return workdir if (workdir / "checkpoints").is_dir() else None


def run(config=None, checkpoint: str | None = None, *, predictions: str | None = None,
        output: str | None = None, split: str = "val", mode: str | None = None,
        tta: bool | None = None, which: str = "latest", max_images: int | None = None,
        num_samples: int = 4, report: bool = True, progress: bool = True) -> dict[str, Any]:
  """Evaluates and writes the outputs (process 0); returns the summary.

  The command-line entry point; callable from Python with the same arguments.
  ``config`` may be None for a training checkpoint (its own config is used).
  """
  if not checkpoint and not predictions:
    raise ValueError("pass --checkpoint (a model to evaluate) or --predictions (PNGs to score)")
  if predictions and config is None:
    raise ValueError("--predictions needs --config (the dataset to score against)")
  samples: list[dict] = []

  def keep_samples(example, pred):
    samples.append({"name": example.get("name", str(len(samples))),
                    "image": np.asarray(example["image"]),
                    "label": np.asarray(example["label"]), "pred": pred})

  extra = {}
  if predictions:
    info = datasets.dataset_info(config.data)
    summary, confusion = runner.score_predictions(predictions, config, split=split,
                                                  max_images=max_images, progress=progress)
  else:
    config, model, variables, info = evaluator_lib.load_for_eval(checkpoint, config,
                                                                 which=which)
    evaluator = evaluator_lib.Evaluator(model, config, mode=mode, tta=tta,
                                        log=lambda line: print(line, flush=True))
    wants_samples = report and num_samples > 0 and jax.process_index() == 0
    result = evaluator.evaluate(variables, split, max_images=max_images,
                                callback=keep_samples if wants_samples else None,
                                max_callbacks=num_samples, progress=progress)
    summary, confusion = result.summary, result.confusion
    extra = {"num_images": result.num_images, "seconds": round(result.seconds, 2),
             "images_per_s": round(result.images_per_s, 2),
             "model_compiles": result.model_compiles, "buckets": result.buckets,
             "devices": evaluator.engine.num_devices, "processes": jax.process_count()}
    if result.bad_files:
      extra["bad_files"] = result.bad_files

  if jax.process_index() == 0:
    print(report_lib.format_summary(summary), flush=True)
    out_dir = epath.Path(output) if output else default_output_dir(checkpoint, predictions)
    num_images = extra.get("num_images")
    if num_images is None:
      num_images = len(datasets.build_source(config.data, split))
      if max_images is not None:
        num_images = min(num_images, int(max_images))
    settings = geometry.InferenceSettings.from_config(config.eval, mode, tta)
    meta = {"model": config.model.get("name"), "dataset": info.name, "split": split,
            "num_images": num_images,
            "checkpoint": str(checkpoint) if checkpoint else None,
            "predictions": str(predictions) if predictions else None,
            "mode": None if predictions else settings.mode,
            "tta": None if predictions else settings.tta,
            "metrics": list(config.eval.get("metrics", ("mIoU",))),
            **{k: v for k, v in extra.items() if k != "num_images"}}
    meta = {k: v for k, v in meta.items() if v is not None}
    paths = report_lib.save_results(out_dir, summary, confusion, info.class_names, meta)
    print(f"wrote {paths['metrics']}, {paths['confusion_npy']}, {paths['confusion_png']}")
    if report:
      md = report_lib.write_report(out_dir, summary, confusion, info.class_names, info.palette,
                                   samples=samples, workdir=_workdir_of(checkpoint), meta=meta,
                                   draw_confusion=False)
      print(f"wrote {md}")
  return summary


def define_flags():
  """The flags of ``python -m offseg_jax.evaluate`` (defined only when it runs:
  the commands share flag names)."""
  cli.define_checkpoint_flags()
  flags.DEFINE_string("predictions", None, "Score this folder of label PNGs instead.")
  flags.DEFINE_string("output", None, "Where to write metrics, confusion and report.")
  flags.DEFINE_string("split", "val", "Dataset split.")
  flags.DEFINE_integer("max_images", None, "Score only the first N images (smoke tests).")
  flags.DEFINE_integer("num_samples", 4, "Sample overlays in the report.")
  flags.DEFINE_bool("report", True, "Write report.md and its figures.")


def main(argv):
  cli.positional(argv)
  logging.set_verbosity(logging.WARNING)
  distributed.initialize_from_flags()
  try:
    run(FLAGS.config, FLAGS.checkpoint, predictions=FLAGS.predictions, output=FLAGS.output,
        split=FLAGS.split, mode=FLAGS.mode, tta=FLAGS.tta, which=FLAGS.which,
        max_images=FLAGS.max_images, num_samples=FLAGS.num_samples, report=FLAGS.report)
  except (image_io.BadFileError, checkpointing.ConfigMismatchError) as e:
    # A user error with a one-line explanation: no traceback.
    sys.exit(f"evaluate: {e}")


if __name__ == "__main__":
  define_flags()
  cli.run(main)
