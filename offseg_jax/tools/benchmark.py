r"""Training and inference throughput of a config's model (images/s).

  python -m offseg_jax.tools.benchmark --config=experiments/configs/default.py \
      [--batch=8] [--dtype=bfloat16] [--steps=20] [--warmup=3] \
      [--size=512,512] [--slide_size=512,1024] [--modes=train,whole,slide] \
      [--compare=torch [--threads=N] [--torch_compile=true]]

* ``train``: the trainer's own jitted step (forward, cross-entropy at label
  resolution, backward, AdamW with the config's parameter groups, BatchNorm
  statistics update) on a batch of ``--batch`` random ``--size`` crops;
* ``whole``: jitted forward, bilinear resize to the input size and argmax on the
  same batch;
* ``slide``: the full single-image slide pipeline (``config.eval`` crop, stride
  and window batch) on one ``--slide_size`` image, host window loop included.

Compilation and ``--warmup`` iterations are excluded. Each of the ``--steps``
timed iterations is timed on its own (ending with ``block_until_ready``); the
figures are the **median** of those ``--steps`` times (all of them are in the
JSON output, ``times_s``). Everything runs on one device (per-device
throughput); the hardware, dtype, resolutions and, where the device reports it,
peak memory are printed with the numbers.

``--compare=torch`` also times Hugging Face transformers' PyTorch SegFormer-B0
(:mod:`offseg_jax.tools.torch_anchor`; ``pip install -e .[compare]``) on the
same batch, size, dtype and classes, eager and (``--torch_compile``) under
``torch.compile``, in the same process after ours, and prints the ratios
(PyTorch's median time / ours: above 1 means ours is faster). ``--threads``
sets PyTorch's intra-op threads (default: every core, which is what XLA's CPU
backend uses).
"""

from __future__ import annotations

import functools
import json
import os
import statistics
import time
from typing import Any, Sequence

from etils import epath
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from input_pipeline import datasets
from offseg_jax import cli, losses, optim, train
from offseg_jax.evaluation import inference
from offseg_jax.models import build_model, construction, layers

FLAGS = flags.FLAGS

MODES = ("train", "whole", "slide")


def _hw(value, default) -> tuple[int, int]:
  if value is None:
    return tuple(int(v) for v in default)
  value = [int(v) for v in value]
  return (value[0], value[0]) if len(value) == 1 else (value[0], value[1])


def step_times(fn, steps: int, warmup: int) -> list[float]:
  """Seconds of each of ``steps`` calls of ``fn()`` (each timed on its own, to
  ``block_until_ready``), after ``warmup`` untimed calls."""
  if steps < 1:
    raise ValueError(f"steps must be at least 1 to time anything, got {steps}")
  for _ in range(warmup):
    jax.block_until_ready(fn())
  times = []
  for _ in range(max(steps, 1)):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return times


def _time(fn, steps: int, warmup: int) -> tuple[float, list[float]]:
  """(compile + first call seconds, seconds of each timed iteration) of ``fn()``."""
  start = time.perf_counter()
  jax.block_until_ready(fn())
  first = time.perf_counter() - start
  return first, step_times(fn, steps, warmup)


def _summary(first: float, times: list[float], images: int, unit: str) -> dict[str, Any]:
  """The median of ``times`` as images/s and ms per ``unit``, plus every time."""
  median = statistics.median(times)
  return {"images_per_s": images / median, f"ms_per_{unit}": median * 1e3,
          "median_s": median, "times_s": times, "compile_s": first}


def _peak_memory(device) -> int | None:
  """Peak bytes in use on ``device`` so far, where the backend reports it (GPU, TPU)."""
  stats = device.memory_stats() if hasattr(device, "memory_stats") else None
  return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def benchmark(config, *, batch: int = 8, dtype: str = "float32", steps: int = 20,
              warmup: int = 3, size: Sequence[int] | None = None,
              slide_size: Sequence[int] | None = None,
              modes: Sequence[str] = MODES, verbose: bool = True) -> dict[str, Any]:
  """Times the requested ``modes``; returns a JSON-able dict of the results."""
  unknown = [m for m in modes if m not in MODES]
  if unknown:
    raise ValueError(f"unknown --modes {unknown}; choose from {MODES}")
  say = print if verbose else (lambda *a, **k: None)
  info = datasets.dataset_info(config.data)
  num_classes = info.num_classes
  model_cfg = dict(config.model)
  model_cfg["dtype"] = jnp.dtype(dtype)
  try:
    model = build_model(model_cfg, num_classes)
  except TypeError as e:
    raise ValueError(f"model {config.model.name!r} does not accept a dtype: {e}") from e
  height, width = _hw(size, config.data.crop_size)
  device = jax.local_devices()[0]
  rng = jax.random.PRNGKey(int(config.get("seed", 0)))
  with jax.default_device(device):
    variables = jax.jit(functools.partial(construction.init_variables, model, config))(rng)
  num_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(variables["params"]))
  results: dict[str, Any] = {
      "model": config.model.name, "num_classes": num_classes, "params_M": num_params / 1e6,
      "device": str(device), "device_kind": device.device_kind, "platform": device.platform,
      "num_devices_used": 1, "jax": jax.__version__, "dtype": dtype, "batch": batch,
      "size": [height, width], "steps": steps, "warmup": warmup}
  say(f"devices: {jax.devices()}")
  say(f"model {config.model.name} ({num_params / 1e6:.3f} M params, {num_classes} classes), "
      f"dtype {dtype}, batch {batch}, input {height}x{width}, on {device.device_kind}")

  data_rng = np.random.default_rng(0)
  images = jax.device_put(data_rng.standard_normal((batch, height, width, 3), np.float32), device)
  labels = data_rng.integers(0, num_classes, (batch, height, width)).astype(np.int32)
  labels[:, : height // 8] = 255                       # some ignored pixels, as in real data
  labels = jax.device_put(labels, device)

  if "train" in modes:
    tx, schedule = optim.build_optimizer(config, variables["params"])
    loss_fn = losses.build_loss({k: dict(v) for k, v in config.losses.items()})
    step_fn = jax.jit(train.make_train_step(model, tx, loss_fn, schedule),
                      donate_argnums=(0,) if device.platform != "cpu" else ())
    state = {"step": jnp.zeros((), jnp.int32), "params": variables["params"],
             "batch_stats": variables["batch_stats"], "opt_state": tx.init(variables["params"]),
             "rng": rng}
    state = jax.device_put(state, device)
    holder = {"state": state}

    def one_train_step():
      holder["state"], out = step_fn(holder["state"], {"image": images, "label": labels})
      return out["loss"]

    first, times = _time(one_train_step, steps, warmup)
    results["train"] = _summary(first, times, batch, "step")
    peak = _peak_memory(device)
    if peak is not None:
      results["train"]["peak_memory_bytes"] = peak
    per_step = results["train"]["median_s"]
    say(f"train: {batch / per_step:.1f} img/s ({per_step * 1e3:.1f} ms/step of {batch} "
        f"{height}x{width}, median of {len(times)}; compile+first {first:.1f} s"
        + (f"; peak memory {peak / 2**30:.2f} GiB" if peak is not None else "") + ")")

  if "whole" in modes:
    @jax.jit
    def forward(variables, images):
      logits, _ = model.apply(variables, images, train=False, rngs={"ham": rng})
      logits = layers.resize_bilinear(logits.astype(jnp.float32), images.shape[1:3])
      return jnp.argmax(logits, axis=-1)

    first, times = _time(lambda: forward(variables, images), steps, warmup)
    results["whole"] = _summary(first, times, batch, "batch")
    per_step = results["whole"]["median_s"]
    say(f"whole inference: {batch / per_step:.1f} img/s ({per_step * 1e3:.1f} ms/batch of "
        f"{batch} {height}x{width}, median of {len(times)}; compile+first {first:.1f} s)")

  if "slide" in modes:
    crop = tuple(config.eval.get("crop_size", None) or (height, width))
    stride = tuple(config.eval.get("stride", None) or crop)
    slide_hw = _hw(slide_size, (crop[0], 2 * crop[1]))
    settings = inference.InferenceSettings(
        mode="slide", crop_size=crop, stride=stride,
        batch_size=int(config.eval.get("batch_size", 1) or 1))
    segmenter = inference.Segmenter(model, variables, settings, mean=config.data.mean,
                                    std=config.data.std, device=device)
    image = data_rng.integers(0, 256, (*slide_hw, 3)).astype(np.uint8)
    windows = len(inference.slide_windows(*slide_hw, crop, stride))
    first, times = _time(lambda: segmenter.labels(image), steps, warmup)
    results["slide"] = dict(_summary(first, times, 1, "image"), image_size=list(slide_hw),
                            crop_size=list(crop), stride=list(stride), windows=windows,
                            window_batch=settings.batch_size)
    per_image = results["slide"]["median_s"]
    say(f"slide inference: {1.0 / per_image:.2f} img/s ({per_image * 1e3:.1f} ms/image of "
        f"{slide_hw[0]}x{slide_hw[1]}, {windows} windows of {crop[0]}x{crop[1]} stride "
        f"{stride[0]}x{stride[1]}, {settings.batch_size} per call, median of {len(times)}; "
        f"compile+first {first:.1f} s)")
  return results


def compare_with_torch(results: dict[str, Any], *, compile_too: bool = True,
                       threads: int | None = None, verbose: bool = True) -> dict[str, Any]:
  """Times PyTorch SegFormer-B0 at ``results``' settings; adds ``results['torch']``.

  For each of ``train`` and ``whole`` in ``results``: PyTorch eager (and
  compiled) median time, and the ratio PyTorch / ours (> 1: ours is faster).
  """
  from offseg_jax.tools import torch_anchor  # pylint: disable=g-import-not-at-top
  say = print if verbose else (lambda *a, **k: None)
  modes = [m for m in ("train", "whole") if m in results]
  device = "cuda" if results["platform"] == "gpu" else "cpu"
  compared: dict[str, Any] = {}
  for name, compiled in (("eager", False), ("compiled", True))[: 2 if compile_too else 1]:
    torch_results = torch_anchor.benchmark(
        batch=results["batch"], size=tuple(results["size"]), num_classes=results["num_classes"],
        steps=results["steps"], warmup=results["warmup"], compiled=compiled,
        dtype=results["dtype"], device=device, threads=threads, modes=modes)
    for mode in modes:
      torch_results[mode]["ratio"] = torch_results[mode]["median_s"] / results[mode]["median_s"]
    compared[name] = torch_results
  results["torch"] = compared
  if results["model"] != "segformer_b0":
    say(f"note: the PyTorch anchor is SegFormer-B0; this config's model is {results['model']}")
  say(f"PyTorch {compared['eager']['torch']}, transformers {compared['eager']['transformers']},"
      f" {compared['eager']['threads']} threads; ratio = PyTorch time / ours (> 1: ours faster)")
  say("| mode | ours | PyTorch eager | ratio |" + (" torch.compile | ratio |" if compile_too else ""))
  for mode in modes:
    row = f"| {mode} | {results[mode]['median_s'] * 1e3:.0f} ms |"
    for name in compared:
      r = compared[name][mode]
      row += f" {r['median_s'] * 1e3:.0f} ms | {r['ratio']:.2f}x |"
    say(row)
  return results


def define_flags():
  """Command-line flags; defined only when run as a program, so the tools
  can be imported together (they share flag names)."""
  config_flags.DEFINE_config_file("config", None, "Experiment config file[:arg].",
                                  lock_config=True)
  flags.DEFINE_integer("batch", 8, "Images per training / whole-inference step.",
                       lower_bound=1)
  flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Computation dtype.")
  flags.DEFINE_integer("steps", 20, "Timed iterations per mode.", lower_bound=1)
  flags.DEFINE_integer("warmup", 3, "Untimed iterations after compilation.", lower_bound=0)
  flags.DEFINE_list("size", None, "H,W of training / whole-inference inputs "
                    "(default: config.data.crop_size).")
  flags.DEFINE_list("slide_size", None, "H,W of the slide-inference image "
                    "(default: one crop high, two crops wide).")
  flags.DEFINE_list("modes", ["train", "whole", "slide"], "What to time.")
  flags.DEFINE_string("output", None, "Also write the results to this JSON file.")
  flags.DEFINE_enum("compare", None, ["torch"], "Also time PyTorch SegFormer-B0 "
                    "(Hugging Face transformers) at the same settings and print the ratios.")
  flags.DEFINE_integer("threads", None, "PyTorch intra-op threads for --compare "
                       "(default: every core).")
  flags.DEFINE_bool("torch_compile", True, "With --compare: also time torch.compile.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  results = benchmark(FLAGS.config, batch=FLAGS.batch, dtype=FLAGS.dtype, steps=FLAGS.steps,
                      warmup=FLAGS.warmup, size=FLAGS.size, slide_size=FLAGS.slide_size,
                      modes=FLAGS.modes)
  if FLAGS.compare == "torch":
    results = compare_with_torch(results, compile_too=FLAGS.torch_compile,
                                 threads=FLAGS.threads or os.cpu_count())
  print(json.dumps(results))
  if FLAGS.output:
    epath.Path(FLAGS.output).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
  define_flags()
  flags.mark_flags_as_required(["config"])
  cli.run(main)
