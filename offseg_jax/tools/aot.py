r"""Ahead-of-time check: compile the train step for a target mesh, without running it.

  python -m offseg_jax.tools.aot --config=experiments/configs/offseg.py:t,ade20k --mesh=8
  python -m offseg_jax.tools.aot --config=... --mesh=8 --config.model.dtype=bfloat16 \
      --config.model.remat=True --config.grad_accum_steps=2
  python -m offseg_jax.tools.aot --config=... --topology=v5e:2x4     # needs libtpu

Builds exactly the trainer's jitted step (model, optimizer with parameter
groups, losses, the ``config.sharding_rules`` placement of
:mod:`offseg_jax.sharding`, the batch split over ``config.mesh.batch_axes``,
donated state, ``grad_accum_steps``), lowers it with abstract inputs for the
global batch on the target mesh and compiles it. Nothing is allocated or run,
so the check costs seconds to minutes on a laptop before paying for hardware.
It prints, per device (an SPMD executable is one program per device):

* memory from XLA's buffer assignment (``compiled.memory_analysis()``):
  arguments (train state + batch shard), outputs, the part of the outputs
  aliased to donated arguments (the new state reuses the old one's buffers),
  temporaries (activations kept for the backward pass, gradients, workspace)
  and the estimated peak = arguments + outputs - aliased + temporaries;
* FLOPs and bytes accessed of one step (``compiled.cost_analysis()``; XLA
  counts a multiply-add as 2 FLOPs, and a loop body once, so with
  ``grad_accum_steps=k`` the micro-batch figure is multiplied by k).

Targets:
* ``--mesh=N`` (or ``A,B`` for a 2-axis ``config.mesh``): N fake CPU devices in
  this process (``jax_num_cpu_devices``, or ``XLA_FLAGS=
  --xla_force_host_platform_device_count=N`` set by the caller). The program is
  compiled by XLA's CPU compiler, which fuses and schedules differently from an
  accelerator's: read the figures as an estimate of the accelerator's. The
  parameter/optimizer and batch sizes are exact.
* ``--topology=NAME`` (e.g. ``v5e:2x4``, ``v4:2x2x1``): the compile-only devices
  of a TPU slice described by libtpu (``jax.experimental.topologies``), compiled
  by the TPU compiler itself; ``--mesh`` then defaults to ``config.mesh.shape``
  with its -1 filled by the slice's devices.

Depthwise convolutions (``--depthwise``, default ``auto``): for a TPU topology
they are traced as grouped convolutions, the program the accelerator runs; for
fake CPU devices as shifted multiply-adds (as the CPU trainer runs them),
because XLA's CPU compiler expands the kernel gradient of a grouped
convolution into a dense one (~C x the FLOPs: 122x for 128 channels), which
would overstate FLOPs and workspace. Same arithmetic either way, so the shift
form's FLOPs are the accelerator's. ``--memory_limit_gib=G`` makes the command
fail (exit status 2) when the estimated peak exceeds G GiB per device.
"""

from __future__ import annotations

import functools
import json
import sys
import time
from typing import Any, Sequence

from absl import app, flags
from etils import epath
import jax
from jax.sharding import NamedSharding, PartitionSpec as P
from ml_collections import config_flags
import numpy as np

from input_pipeline import datasets, loader
from offseg_jax import cli, losses, optim, sharding, train
from offseg_jax.models import construction, layers

FLAGS = flags.FLAGS
GIB = 1024 ** 3
MIB = 1024 ** 2


def parse_mesh(text: str, num_axes: int) -> tuple[int, ...]:
  """``'8'`` or ``'4,2'`` -> mesh shape with one entry per ``config.mesh`` axis."""
  try:
    shape = tuple(int(v) for v in str(text).replace("x", ",").split(",") if v.strip())
  except ValueError:
    raise ValueError(f"--mesh={text!r}: expected sizes like 8 or 4,2") from None
  if len(shape) != num_axes or min(shape, default=0) < 1:
    raise ValueError(f"--mesh={text!r} needs {num_axes} positive size(s), one per "
                     f"config.mesh.axes axis")
  return shape


def fake_cpu_devices(count: int) -> list:
  """``count`` CPU devices of this process, creating fake ones if still possible."""
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  initialized = getattr(xla_bridge, "backends_are_initialized", lambda: True)()
  if not initialized:
    jax.config.update("jax_num_cpu_devices", int(count))
  devices = jax.devices("cpu")
  if len(devices) < count:
    raise RuntimeError(
        f"{len(devices)} CPU device(s) available but the mesh needs {count}: run with "
        f"XLA_FLAGS=--xla_force_host_platform_device_count={count} (set before JAX starts)")
  return devices[:count]


def tpu_devices(topology: str, chip_config_name: str = "") -> list:
  """Compile-only devices of a TPU slice (needs libtpu, no TPU attached)."""
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  kwargs = {"chip_config_name": chip_config_name} if chip_config_name else {}
  try:
    return list(topologies.get_topology_desc(topology_name=topology, platform="tpu",
                                             **kwargs).devices)
  except Exception as e:  # pylint: disable=broad-except
    raise RuntimeError(f"cannot describe TPU topology {topology!r} ({type(e).__name__}: {e}); "
                       "it needs libtpu (pip install 'jax[tpu]') and a topology name "
                       "such as v5e:2x4 or v4:2x2x1") from e


def make_target_mesh(devices: Sequence[Any], shape: Sequence[int], axes: Sequence[str]):
  """A mesh of ``devices`` (exactly prod(shape) of them) with Auto axes, as training."""
  if int(np.prod(shape)) != len(devices):
    raise ValueError(f"mesh {tuple(shape)} needs {int(np.prod(shape))} devices, "
                     f"got {len(devices)}")
  return sharding.build_mesh(shape, axes, devices, what="--mesh")


def _bytes_per_device(abstract_tree) -> int:
  """Bytes of one device's shards of ShapeDtypeStructs that carry shardings."""
  total = 0
  for leaf in jax.tree_util.tree_leaves(abstract_tree):
    shape = leaf.sharding.shard_shape(leaf.shape)
    total += int(np.prod(shape)) * np.dtype(leaf.dtype).itemsize
  return total


def analyze(config, mesh, *, depthwise: str = "auto") -> dict[str, Any]:
  """Lowers and compiles ``config``'s train step on ``mesh``; returns the figures.

  Args:
    config: an experiment config (as the trainer reads it).
    mesh: the target mesh (axes ``config.mesh.axes``).
    depthwise: how depthwise convolutions are traced: 'conv', 'shift', or
      'auto' ('shift' for CPU targets, 'conv' otherwise; see module docstring).

  Returns:
    A JSON-able dict: the setting, ``memory`` (bytes per device: arguments,
    outputs, aliased, temporaries, generated_code, peak_estimate, state, batch),
    ``flops`` and ``bytes_accessed`` per device, ``lower_s`` and ``compile_s``.
  """
  sharding.check_batch_split(config, mesh)
  if depthwise == "auto":
    depthwise = "shift" if mesh.devices.flat[0].platform == "cpu" else "conv"
  if depthwise not in ("conv", "shift"):
    raise ValueError(f"depthwise={depthwise!r}; choose auto, conv or shift")
  info = datasets.dataset_info(config.data)
  model = construction.create_model(config, info.num_classes)
  rng = jax.random.PRNGKey(int(config.seed))
  init_rng, state_rng, _ = jax.random.split(rng, 3)
  with layers.depthwise_impl(depthwise):
    abstract_vars = jax.eval_shape(functools.partial(construction.init_variables, model, config),
                                   init_rng)
    tx, schedule = optim.build_optimizer(config, abstract_vars["params"])
    loss_fn = losses.build_loss({k: dict(v) for k, v in config.losses.items()})
    abstract_state = jax.eval_shape(train.make_init_state(model, config, tx, state_rng),
                                    init_rng)
    shardings = sharding.config_state_shardings(abstract_state, mesh, config)
    state_in = jax.tree_util.tree_map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
        abstract_state, shardings)
    data_sharding = sharding.batch_sharding(mesh, config)
    batch_in = {k: jax.ShapeDtypeStruct(shape, dtype, sharding=data_sharding)
                for k, (shape, dtype) in loader.batch_spec(config).items()}
    step = jax.jit(train.config_train_step(config, model, tx, loss_fn, schedule, mesh),
                   in_shardings=(shardings, None),
                   out_shardings=(shardings, NamedSharding(mesh, P())),
                   donate_argnums=(0,))
    start = time.perf_counter()
    lowered = step.lower(state_in, batch_in)
    lower_s = time.perf_counter() - start
    start = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start

  stats = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):      # older jax: one dict per program
    cost = cost[0] if cost else {}
  cost = dict(cost or {})
  memory = {
      "arguments": int(stats.argument_size_in_bytes),
      "outputs": int(stats.output_size_in_bytes),
      "aliased": int(stats.alias_size_in_bytes),
      "temporaries": int(stats.temp_size_in_bytes),
      "generated_code": int(stats.generated_code_size_in_bytes),
      "state": _bytes_per_device(state_in),
      "batch": _bytes_per_device(batch_in),
  }
  memory["peak_estimate"] = (memory["arguments"] + memory["outputs"] - memory["aliased"]
                             + memory["temporaries"])
  xla_peak = int(getattr(stats, "peak_memory_in_bytes", 0) or 0)
  if xla_peak:
    memory["xla_peak"] = xla_peak
  num_params = sum(int(np.prod(x.shape))
                   for x in jax.tree_util.tree_leaves(abstract_vars["params"]))
  device = mesh.devices.flat[0]
  data_devices = sharding.batch_devices(config, mesh)
  sharded_leaves = sum(not sh.is_fully_replicated for sh in jax.tree_util.tree_leaves(shardings))
  return {
      "model": config.model.name, "params_M": num_params / 1e6,
      "dtype": str(config.model.get("dtype", "float32")),
      "remat": bool(config.model.get("remat", False)),
      "grad_accum_steps": int(config.get("grad_accum_steps", 1)),
      "transfer_dtype": loader.transfer_dtype(config),
      "dataset": info.name, "num_classes": info.num_classes,
      "crop_size": [int(v) for v in config.data.crop_size],
      "global_batch": int(config.batch_size),
      "per_device_batch": int(config.batch_size) // data_devices,
      "mesh": {k: int(v) for k, v in mesh.shape.items()},
      "batch_axes": list(sharding.batch_axes(config, mesh)),
      "sharded_leaves": int(sharded_leaves),
      "state_leaves": len(jax.tree_util.tree_leaves(shardings)),
      "platform": device.platform, "device_kind": device.device_kind,
      "num_devices": int(mesh.devices.size), "depthwise": depthwise,
      "jax": jax.__version__, "memory": memory,
      # XLA counts a loop body once: with k micro-batches (a scan) one step does
      # k times the body's work; the optimizer update outside it is negligible.
      "flops": float(cost.get("flops", float("nan"))) * int(config.get("grad_accum_steps", 1)),
      "bytes_accessed": (float(cost.get("bytes accessed", float("nan")))
                         * int(config.get("grad_accum_steps", 1))),
      "xla_flops": float(cost.get("flops", float("nan"))),
      "lower_s": lower_s, "compile_s": compile_s,
  }


def format_report(r: dict[str, Any]) -> str:
  """The human-readable report of :func:`analyze`."""
  m = r["memory"]

  def line(label, value, note=""):
    return f"  {label:<14}{value / MIB:>10.1f} MiB{('  ' + note) if note else ''}"

  h, w = r["crop_size"]
  kind = r["platform"] if r["device_kind"] == r["platform"] else (
      f"{r['platform']} {r['device_kind']}")
  mesh = " x ".join(f"{k}={v}" for k, v in r["mesh"].items())
  out = [
      f"train step of {r['model']} ({r['params_M']:.2f} M params), {r['dataset']} "
      f"({r['num_classes']} classes), crop {h}x{w}, compute {r['dtype']}, remat "
      f"{'backbone' if r['remat'] else 'off'}, grad_accum_steps {r['grad_accum_steps']}, "
      f"{r['transfer_dtype']} inputs, depthwise convs as {r['depthwise']}",
      f"global batch {r['global_batch']} on mesh {mesh} ({r['num_devices']} x {kind}): "
      f"{r['per_device_batch']} per device (batch over {tuple(r['batch_axes'])}); "
      f"lowered in {r['lower_s']:.1f} s, compiled in {r['compile_s']:.1f} s (not run)",
      "per-device memory (XLA buffer assignment):",
      line("arguments", m["arguments"],
           f"train state {m['state'] / MIB:.1f} MiB ({r['sharded_leaves']} of "
           f"{r['state_leaves']} leaves sharded) + batch shard {m['batch'] / MIB:.1f} MiB"),
      line("outputs", m["outputs"]),
      line("aliased", m["aliased"], "outputs written into the donated state"),
      line("temporaries", m["temporaries"], "activations, gradients, workspace"),
      line("code", m["generated_code"]),
      line("peak (est.)", m["peak_estimate"], "arguments + outputs - aliased + temporaries"),
  ]
  if "xla_peak" in m and r["platform"] != "cpu":
    out.append(line("peak (XLA)", m["xla_peak"]))
  out.append(f"per-device compute: {r['flops'] / 1e9:.2f} GFLOP per step "
             f"({r['flops'] / 2e9:.2f} G multiply-adds), {r['bytes_accessed'] / GIB:.2f} GiB "
             f"accessed")
  if r["grad_accum_steps"] > 1:
    out.append(f"  (XLA counts the micro-batch loop once, {r['xla_flops'] / 1e9:.2f} GFLOP; "
               f"x {r['grad_accum_steps']} micro-batches)")
  if r["platform"] == "cpu":
    out.append("(CPU compiler: an accelerator fuses differently; state and batch sizes are "
               "exact, temporaries an estimate)")
  return "\n".join(out)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = FLAGS.config
  axes = tuple(config.mesh.axes)
  if not FLAGS.mesh and not FLAGS.topology:
    raise app.UsageError("give --mesh=N (fake CPU devices) or --topology=NAME (TPU)")
  try:                      # setup errors are one line; compile errors keep their trace
    if FLAGS.topology:
      devices = tpu_devices(FLAGS.topology, FLAGS.chip_config_name)
      if FLAGS.mesh:
        shape = parse_mesh(FLAGS.mesh, len(axes))
        mesh = make_target_mesh(devices[:int(np.prod(shape))], shape, axes)
      else:
        mesh = sharding.make_mesh(config, devices)
    else:
      shape = parse_mesh(FLAGS.mesh, len(axes))
      mesh = make_target_mesh(fake_cpu_devices(int(np.prod(shape))), shape, axes)
    sharding.check_batch_split(config, mesh)
  except (RuntimeError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  result = analyze(config, mesh, depthwise=FLAGS.depthwise)
  print(format_report(result), flush=True)
  if FLAGS.json:
    epath.Path(FLAGS.json).write_text(json.dumps(result, indent=1))
  limit = FLAGS.memory_limit_gib
  if limit and result["memory"]["peak_estimate"] > limit * GIB:
    print(f"DOES NOT FIT: estimated peak {result['memory']['peak_estimate'] / GIB:.2f} GiB "
          f"> --memory_limit_gib={limit:g} per device", flush=True)
    sys.exit(2)
  if limit:
    print(f"fits: estimated peak {result['memory']['peak_estimate'] / GIB:.2f} GiB <= "
          f"{limit:g} GiB per device", flush=True)


def define_flags():
  """Command-line flags (defined only when run as a program)."""
  config_flags.DEFINE_config_file("config", None, "Experiment config: path.py[:arg].",
                                  lock_config=True)
  flags.DEFINE_string("mesh", "", "Mesh shape, one size per config.mesh axis (e.g. 8).")
  flags.DEFINE_string("topology", "", "TPU topology (e.g. v5e:2x4); needs libtpu.")
  flags.DEFINE_string("chip_config_name", "", "libtpu chip config (e.g. megacore).")
  flags.DEFINE_enum("depthwise", "auto", ["auto", "conv", "shift"],
                    "Depthwise convs as grouped convs or shifted multiply-adds "
                    "(auto: shifts for CPU targets, convs for TPU).")
  flags.DEFINE_float("memory_limit_gib", 0.0, "Fail (exit 2) above this peak per device.")
  flags.DEFINE_string("json", "", "Also write the figures to this JSON file.")
  flags.mark_flag_as_required("config")


if __name__ == "__main__":
  define_flags()
  cli.run(main)
