r"""Evaluation throughput and compile count on a fake ADE20K validation split.

  python -m offseg_jax.tools.benchmark_evaluation --devices=8 [--model=tiny] \
      [--images=64] [--mode=whole] [--batch=8] [--workdir=/tmp/offseg_evalbench]

Writes (once) an ADE20K folder layout of ``--images`` JPEG images with label
PNGs of varied sizes: with ``--sizes=distinct`` (default) every image has its
own size (short side 256-640, aspect ratio 1:2-2:1, as ADE20K's validation
images, which come in hundreds of sizes); ``--sizes=pool`` draws them from 16
sizes (4 images each). It then evaluates a
randomly initialised ``--model`` on it with the ADE20K test pipeline (short side
resized to 512, long side at most 2048) on ``--devices`` simulated CPU devices
(``--xla_force_host_platform_device_count``, set before JAX starts), and prints
one JSON line: XLA compiles and their seconds, and images/s of a cold
evaluation (compiles included, what a user waits for) and of a warm one (the
second evaluation of a training run).

``--impl=runner`` times the per-image runner (``evaluation.runner``) of earlier
versions instead of the batched evaluator: run this file
(``python /path/to/benchmark_evaluation.py``) with ``PYTHONPATH`` pointing at
such a tree (one with ``offseg_jax.cli``); ``auto`` picks the batched evaluator
when the package has it.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Sequence

from absl import flags
import numpy as np

from offseg_jax import cli

SIZES = ((512, 683), (683, 512), (512, 512), (384, 512), (512, 768), (375, 500),
         (256, 341), (480, 640), (600, 450), (768, 512), (427, 640), (512, 640),
         (333, 500), (640, 480), (300, 400), (720, 540))


def image_sizes(num_images: int, kind: str, rng) -> list[tuple[int, int]]:
  """Original (h, w) sizes: a shuffled pool of 16, or all distinct ADE-like ones."""
  if kind == "pool":
    sizes = [SIZES[i % len(SIZES)] for i in range(num_images)]
    rng.shuffle(sizes)
    return sizes
  sizes = []
  while len(sizes) < num_images:
    short = int(rng.integers(256, 641))
    ratio = float(np.exp(rng.uniform(np.log(0.5), np.log(2.0))))
    size = (short, int(round(short * ratio))) if ratio >= 1 else (int(round(short / ratio)), short)
    if size not in sizes:
      sizes.append(size)
  return sizes


def write_fake_ade(root: str, num_images: int, kind: str = "distinct", seed: int = 0) -> str:
  """An ADEChallengeData2016 validation layout under ``root/kind``; returns it.

  ``root`` may be local or any ``etils.epath`` URL (``gs://...``).
  """
  import cv2  # pylint: disable=g-import-not-at-top
  from etils import epath  # pylint: disable=g-import-not-at-top
  root = epath.Path(root) / kind
  img_dir = root / "ADEChallengeData2016" / "images" / "validation"
  ann_dir = root / "ADEChallengeData2016" / "annotations" / "validation"
  marker = root / f"complete_{num_images}_{seed}"
  if marker.exists():
    return os.fspath(root)
  img_dir.mkdir(parents=True, exist_ok=True)
  ann_dir.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(seed)
  sizes = image_sizes(num_images, kind, rng)
  for i, (h, w) in enumerate(sizes):
    # Blocky labels with a few classes per image (0 = ignore in ADE's files).
    cells = rng.integers(0, 151, (max(h // 64, 1) + 1, max(w // 64, 1) + 1)).astype(np.uint8)
    label = cv2.resize(cells, (w, h), interpolation=cv2.INTER_NEAREST)
    image = (rng.normal(0, 20, (h, w, 3)) + label[..., None] * 1.5 + 40).clip(0, 255)
    name = f"ADE_val_{i:08d}"
    (img_dir / (name + ".jpg")).write_bytes(cv2.imencode(".jpg", image.astype(np.uint8))[1]
                                            .tobytes())
    (ann_dir / (name + ".png")).write_bytes(cv2.imencode(".png", label)[1].tobytes())
  marker.write_text("")
  return os.fspath(root)


def benchmark(model_name: str = "tiny", images: int = 64, sizes: str = "distinct",
              mode: str = "whole", batch: int = 8, impl: str = "auto",
              workdir: str = "/tmp/offseg_evalbench", warm: int = 1,
              buckets_per_octave: int | None = None) -> tuple[dict, np.ndarray]:
  """Times evaluations of ``model_name`` on the fake split; returns the figures
  and the confusion matrix. Runs on the devices JAX has (see the module doc).

  Raises:
    ValueError: ``impl='evaluator'`` but this offseg_jax has no batched evaluator.
  """
  import functools  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from jax import monitoring  # pylint: disable=g-import-not-at-top
  from absl import logging  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.ERROR)

  from experiments.configs import common  # pylint: disable=g-import-not-at-top
  from input_pipeline import datasets  # pylint: disable=g-import-not-at-top

  compiles = {"count": 0, "seconds": 0.0}

  def on_duration(event, seconds, **kwargs):
    del kwargs
    if event == "/jax/core/compile/backend_compile_duration":
      compiles["count"] += 1
      compiles["seconds"] += seconds

  monitoring.register_event_duration_secs_listener(on_duration)

  root = write_fake_ade(workdir, images, sizes)
  config = common.base_config()
  config.model = common.model_config(model_name)
  config.data = common.data_config("ade20k", root=root + "/ADEChallengeData2016",
                                   num_threads=2)
  config.eval.mode = mode
  config.eval.batch_size = batch
  if buckets_per_octave is not None:
    config.eval.buckets_per_octave = buckets_per_octave
  info = datasets.dataset_info(config.data)

  try:
    from offseg_jax.evaluation import evaluator as evaluator_lib  # pylint: disable=g-import-not-at-top
    from offseg_jax.models import construction  # pylint: disable=g-import-not-at-top
    create_model, init_variables = construction.create_model, construction.init_variables
  except ImportError:     # an earlier tree: the per-image runner, model code in train
    evaluator_lib = None
    from offseg_jax import train  # pylint: disable=g-import-not-at-top
    create_model, init_variables = train.create_model, train.init_variables
  if impl == "auto":
    impl = "evaluator" if evaluator_lib is not None else "runner"
  if impl == "evaluator" and evaluator_lib is None:
    raise ValueError("--impl=evaluator: this offseg_jax has no batched evaluator")

  model = create_model(config, info.num_classes)
  variables = jax.jit(functools.partial(init_variables, model, config))(jax.random.PRNGKey(0))
  jax.block_until_ready(variables)
  base = dict(compiles)

  if impl == "runner":
    from offseg_jax.evaluation import runner  # pylint: disable=g-import-not-at-top

    def run_once():
      return runner.evaluate_model(model, variables, config, progress=False)[1]
  else:
    ev = evaluator_lib.Evaluator(model, config)

    def run_once():
      return ev.evaluate(variables).confusion

  timings = []
  for _ in range(1 + max(warm, 0)):
    start = time.perf_counter()
    confusion = run_once()
    timings.append(time.perf_counter() - start)
    if len(timings) == 1:
      cold = {"count": compiles["count"] - base["count"],
              "seconds": compiles["seconds"] - base["seconds"]}
  result = {
      "impl": impl, "model": model_name, "devices": jax.device_count(), "mode": mode,
      "images": images, "sizes": sizes, "batch": batch,
      "labelled_pixels": int(confusion.sum()),
      "compiles": cold["count"], "compile_s": round(cold["seconds"], 2),
      "warm_compiles": compiles["count"] - base["count"] - cold["count"],
      "cold_s": round(timings[0], 2), "cold_images_per_s": round(images / timings[0], 2),
      "warm_s": round(min(timings[1:]), 2) if len(timings) > 1 else None,
      "warm_images_per_s": (round(images / min(timings[1:]), 2)
                            if len(timings) > 1 else None)}
  return result, confusion


def define_flags(values: flags.FlagValues = flags.FLAGS) -> None:
  """The command's flags, on ``values`` (defined only when it runs)."""
  on = {"flag_values": values}
  flags.DEFINE_integer("devices", 1, "Simulated CPU devices.", **on)
  flags.DEFINE_string("model", "tiny", "Registered model name.", **on)
  flags.DEFINE_integer("images", 64, "Fake validation images.", **on)
  flags.DEFINE_enum("sizes", "distinct", ["distinct", "pool"],
                    "Every image its own size, or sizes drawn from a pool of 16.", **on)
  flags.DEFINE_enum("mode", "whole", ["whole", "slide"], "Inference mode.", **on)
  flags.DEFINE_integer("batch", 8, "Global eval batch.", **on)
  flags.DEFINE_enum("impl", "auto", ["auto", "runner", "evaluator"],
                    "Batched evaluator or per-image runner (auto: the evaluator if any).", **on)
  flags.DEFINE_string("workdir", "/tmp/offseg_evalbench", "Where the fake split is written.",
                      **on)
  flags.DEFINE_integer("warm", 1, "Timed repeat evaluations.", **on)
  flags.DEFINE_integer("buckets_per_octave", None,
                       "config.eval.buckets_per_octave (evaluator only; 0 = exact sizes).", **on)
  flags.DEFINE_string("save", None, "Write the confusion matrix (.npy) here.", **on)


def command(argv: Sequence[str], values: flags.FlagValues = flags.FLAGS) -> int:
  """Runs :func:`benchmark` on ``--devices`` devices and prints its JSON line."""
  cli.positional(argv)
  # Simulated devices must be configured before JAX initialises its backend.
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={values.devices}")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax  # pylint: disable=g-import-not-at-top
  if jax.default_backend() == "cpu" and jax.device_count() != values.devices:
    # JAX had started before (main() in a process that uses it).
    print(f"error: --devices={values.devices}, but JAX already runs on {jax.device_count()} "
          "devices in this process", file=sys.stderr)
    return 1
  try:
    result, confusion = benchmark(
        values.model, values.images, values.sizes, values.mode, values.batch, values.impl,
        values.workdir, values.warm, values.buckets_per_octave)
  except (KeyError, OSError, ValueError) as e:   # an unknown model, an unwritable workdir
    print(f"error: {e.args[0] if isinstance(e, KeyError) else e}", file=sys.stderr)
    return 1
  if values.save:
    from etils import epath  # pylint: disable=g-import-not-at-top
    save = values.save if values.save.endswith(".npy") else values.save + ".npy"   # as np.save
    with epath.Path(save).open("wb") as f:
      np.save(f, confusion)
  print(json.dumps(result), flush=True)
  return 0


# main([...]): the command in this process, e.g. from tests and notebooks.
main = cli.in_process(define_flags, command)


if __name__ == "__main__":
  cli.run(command, define_flags)
