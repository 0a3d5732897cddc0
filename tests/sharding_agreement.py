r"""Training agrees on 1, 2, 4 and 8 devices, replicated and with FSDP.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \
      python tests/sharding_agreement.py [--model=offseg_nano] [--steps=3]

Builds the default experiment (``experiments/configs/default.py``: 64x64
synthetic scenes, global batch 8) and trains ``--steps`` steps the way the
trainer does (``jax.eval_shape`` of the init -> ``sharding.state_shardings`` ->
``jit(init, out_shardings)`` -> ``jit(step, donate)``, batches placed with
``loader.to_global(..., axis=sharding.batch_partition(config))``) on each
setting below, feeding the same global uint8 batches. Every run is compared
with the 1-device run:

* after the first step (same initial state, same batch: only float rounding
  may differ): the gradients (Adam's first moments, 0.1 x the gradients) as
  ``||g - g_ref|| / ||g_ref||`` and the BatchNorm running statistics (per-device
  statistics would differ: the 8 examples differ);
* over all steps: the loss and gradient norm of every step, the final
  parameters and BatchNorm statistics.

Adam's eps is 1e-3 instead of the recipe's 1e-8 (``--adam_eps``; see
:func:`make_config` for why). Prints the max differences, one line per setting,
and exits 1 if any exceeds ``--atol + --rtol * |reference|`` (gradients:
``--rtol``), or if an FSDP setting shards no parameter.

Used by ``tests/test_sharding.py`` (with ``--model=tiny``, to fit its time).
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from experiments.configs import default  # noqa: E402
from input_pipeline import datasets, loader, synthetic  # noqa: E402
from offseg_jax import losses, optim, sharding, train  # noqa: E402
from offseg_jax.models import construction  # noqa: E402

# (name, devices, mesh shape, mesh axes, rules): the first is the reference.
REPLICATED = ((".*", "replicate"),)
FSDP = ((".*", "fsdp"),)
SETTINGS = (
    ("1 device", 1, (1,), ("data",), REPLICATED),
    ("2 data", 2, (2,), ("data",), REPLICATED),
    ("4 data", 4, (4,), ("data",), REPLICATED),
    ("8 data", 8, (8,), ("data",), REPLICATED),
    ("2 = 1 data x 2 fsdp", 2, (1, 2), ("data", "fsdp"), FSDP),
    ("4 = 2 data x 2 fsdp", 4, (2, 2), ("data", "fsdp"), FSDP),
    ("8 = 4 data x 2 fsdp", 8, (4, 2), ("data", "fsdp"), FSDP),
)


def make_config(model: str, fsdp_min_size: int, adam_eps: float):
  config = default.get_config(model)
  config.batch_size = 8
  # Full learning rate from the first step, so that the parameters move.
  config.optimizer.warmup_steps = 0
  # Adam divides each gradient element by its own magnitude (plus eps): with the
  # recipe's eps=1e-8 an element whose gradient is ~1e-8 (there are such, e.g.
  # in kernels feeding a BatchNorm) turns a float32 rounding difference of the
  # summed gradient (5e-7 of the gradient's norm here, whatever the devices)
  # into an update difference of up to ~15 % of the learning rate, and the runs
  # drift apart from there. eps=1e-3 bounds that gain (lr / eps ~ 2), so the
  # parameters can be compared tightly after every step; the placement, the
  # gradients and the BatchNorm statistics under test are the same.
  config.optimizer.eps = adam_eps
  config.fsdp_min_size = fsdp_min_size
  return config


def make_batches(config, steps: int) -> list[dict]:
  """``steps`` global batches in the loader's uint8 layout (image, label, valid_hw)."""
  h, w = (int(v) for v in config.data.crop_size)
  source = synthetic.SyntheticSource("train", steps * config.batch_size, h, int(config.seed))
  batches = []
  for s in range(steps):
    ex = [source[s * config.batch_size + i] for i in range(config.batch_size)]
    batches.append({"image": np.stack([e["image"] for e in ex]),
                    "label": np.stack([e["label"] for e in ex]),
                    "valid_hw": np.full((config.batch_size, 2), (h, w), np.int32)})
  return batches


def run(config, num_devices, shape, axes, rules, batches):
  """Trains on one setting; returns (losses, params, batch_stats, sharded params)."""
  config = config.copy_and_resolve_references()
  config.mesh.shape, config.mesh.axes = shape, axes
  config.sharding_rules = rules
  mesh = sharding.make_mesh(config, jax.devices()[:num_devices])
  sharding.check_batch_split(config, mesh)

  info = datasets.dataset_info(config.data)
  model = construction.create_model(config, info.num_classes)
  init_rng, state_rng, _ = jax.random.split(jax.random.PRNGKey(config.seed), 3)
  abstract_vars = jax.eval_shape(functools.partial(construction.init_variables, model, config),
                                 init_rng)
  tx, schedule = optim.build_optimizer(config, abstract_vars["params"])
  loss_fn = losses.build_loss({k: dict(v) for k, v in config.losses.items()})
  init_state = train.make_init_state(model, config, tx, state_rng)
  abstract_state = jax.eval_shape(init_state, init_rng)
  shardings = sharding.config_state_shardings(abstract_state, mesh, config)
  state = jax.jit(init_state, out_shardings=shardings)(init_rng)
  step = jax.jit(train.config_train_step(config, model, tx, loss_fn, schedule),
                 in_shardings=(shardings, None), out_shardings=(shardings, None),
                 donate_argnums=(0,))
  axis = sharding.batch_partition(config)
  history, first = [], None
  for batch in batches:
    state, metrics = step(state, loader.to_global(batch, mesh, axis=axis))
    history.append((float(metrics["loss"]), float(metrics["grad_norm"])))
    if first is None:
      first = _snapshot(state)
  # The placement asked for is the placement the step returns.
  for got, want in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(shardings)):
    assert got.sharding.is_equivalent_to(want, got.ndim), (got.sharding, want)
  sharded = sum(not s.is_fully_replicated
                for s in jax.tree_util.tree_leaves(shardings["params"]))
  summary = sharding.placement_summary(abstract_state, shardings)
  history = np.asarray(history)
  return ({"loss": history[:, 0], "grad_norm": history[:, 1], "first": first,
           "last": _snapshot(state)}, sharded, summary)


def _snapshot(state) -> dict:
  """Host copies of the parameters, the BatchNorm statistics and Adam's first
  moments (after one step: 0.1 x the gradients, exactly)."""
  moments = {sharding.path_str(p): x for p, x in
             jax.tree_util.tree_leaves_with_path(state["opt_state"])
             if "mu" in sharding.path_str(p).split("/")}
  return jax.device_get({"params": state["params"], "batch_stats": state["batch_stats"],
                         "grads": moments})


def max_abs(a, b) -> float:
  """Largest |a - b| over the leaves of two trees."""
  return max((float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)),
                           initial=0.0))
              for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b))),
             default=0.0)


def close(a, b, rtol, atol) -> bool:
  """Every leaf of ``a`` within ``atol + rtol * |b|`` of ``b``."""
  return all(np.allclose(x, y, rtol=rtol, atol=atol)
             for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def rel_norm(a, b) -> float:
  """``||a - b|| / ||b||`` over all leaves of two trees together."""
  pairs = [(np.asarray(x, np.float64), np.asarray(y, np.float64))
           for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b))]
  num = np.sqrt(sum(float(np.sum((x - y) ** 2)) for x, y in pairs))
  den = np.sqrt(sum(float(np.sum(y ** 2)) for _, y in pairs))
  return float(num / den) if den > 0 else float(num)


def main() -> int:
  n = jax.device_count()
  config = make_config(ARGS.model, ARGS.fsdp_min_size, ARGS.adam_eps)
  batches = make_batches(config, ARGS.steps)
  print(f"model {ARGS.model}, global batch {config.batch_size}, {ARGS.steps} steps, Adam eps "
        f"{ARGS.adam_eps:g}, {n} {jax.devices()[0].platform} devices; max |difference| to the "
        f"1-device run "
        f"(grads: relative norm, grad_norm: ratio - 1)", flush=True)
  ref = None
  failed = []
  for name, devices, shape, axes, rules in SETTINGS:
    if devices > n:
      print(f"{name}: skipped ({n} devices)")
      continue
    start = time.perf_counter()
    out, sharded, summary = run(config, devices, shape, axes, rules, batches)
    seconds = time.perf_counter() - start
    if ref is None:
      ref = out
      print(f"{name:<20} losses {np.array2string(out['loss'], precision=6)}  "
            f"[{summary}; {seconds:.0f} s]", flush=True)
      continue
    f, l, rf, rl = out["first"], out["last"], ref["first"], ref["last"]
    # After one step: everything is a function of the same initial state and
    # batch, so only float rounding (reduction order) may differ.
    first = {"grads": rel_norm(f["grads"], rf["grads"]),
             "batch_stats": max_abs(f["batch_stats"], rf["batch_stats"]),
             "params": max_abs(f["params"], rf["params"])}
    last = {"loss": max_abs(out["loss"], ref["loss"]),
            "grad_norm": max_abs(out["grad_norm"] / ref["grad_norm"], 1.0),
            "batch_stats": max_abs(l["batch_stats"], rl["batch_stats"]),
            "params": max_abs(l["params"], rl["params"])}
    print(f"{name:<20} step 1: " + "  ".join(f"{k} {v:.1e}" for k, v in first.items())
          + f" | {ARGS.steps} steps: " + "  ".join(f"{k} {v:.1e}" for k, v in last.items())
          + f"  [{summary}; {seconds:.0f} s]", flush=True)
    checks = {
        "step-1 gradients": first["grads"] <= ARGS.rtol,
        "step-1 batch_stats": close(f["batch_stats"], rf["batch_stats"], ARGS.rtol, ARGS.atol),
        "losses": close(out["loss"], ref["loss"], ARGS.rtol, ARGS.atol),
        "gradient norms": close(out["grad_norm"], ref["grad_norm"], ARGS.rtol, 0.0),
        "final batch_stats": close(l["batch_stats"], rl["batch_stats"], ARGS.rtol, ARGS.atol),
        "final params": close(l["params"], rl["params"], ARGS.rtol, ARGS.atol)}
    failed += [f"{name}: {k} differ beyond tolerance" for k, ok in checks.items() if not ok]
    if rules == FSDP and not sharded:
      failed.append(f"{name}: no parameter is sharded")
  for line in failed:
    print("FAIL", line)
  if not failed:
    print("all settings agree")
  return 1 if failed else 0


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--model", default="offseg_nano", help="default.py's model argument")
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--fsdp_min_size", type=int, default=256,
                      help="small, so that most parameters are sharded under FSDP")
  parser.add_argument("--rtol", type=float, default=1e-5)
  parser.add_argument("--atol", type=float, default=1e-5)
  parser.add_argument("--adam_eps", type=float, default=1e-3,
                      help="1e-8 (the recipe's) shows how Adam amplifies rounding; see make_config")
  ARGS = parser.parse_args()
  sys.exit(main())
