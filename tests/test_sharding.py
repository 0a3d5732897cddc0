"""Meshes, the batch layout and the placement of the train state (offseg_jax.sharding)."""

import functools
import os
import re
import subprocess
import sys
from pathlib import Path

from absl import flags
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from experiments.configs import default
from input_pipeline import loader
from offseg_jax import optim, sharding, train
from offseg_jax.evaluation import engine as engine_lib
from offseg_jax.models import construction, layers
from offseg_jax.tools import aot

REPO = Path(__file__).resolve().parents[1]
S = jax.ShapeDtypeStruct


def _mesh(shape, axes):
  return sharding.build_mesh(shape, axes, jax.devices()[:int(np.prod(shape))])


def _mesh_config(shape, axes, **fields):
  return ml_collections.ConfigDict({"mesh": {"shape": shape, "axes": axes, **fields}})


def _abstract_state():
  """A train state shaped as ``train.make_init_state`` makes it, with the real
  optimizer (AdamW per parameter group under ``multi_transform``, chained after
  gradient clipping) over a small parameter tree."""
  f32 = jnp.float32
  params = {
      "backbone": {"stem": {"conv": {"kernel": S((3, 3, 3, 64), f32)},
                            "norm": {"scale": S((64,), f32), "bias": S((64,), f32)}},
                   "block": {"fc": {"kernel": S((64, 256), f32), "bias": S((256,), f32)}}},
      "decode_head": {"cls": {"kernel": S((1, 1, 256, 9), f32), "bias": S((9,), f32)}},
  }
  tx, _ = optim.build_optimizer(default.get_config(), params)
  stats = {"backbone": {"stem": {"norm": {"mean": S((64,), f32), "var": S((64,), f32)}}}}
  return {"step": S((), jnp.int32), "params": params, "batch_stats": stats,
          "opt_state": jax.eval_shape(tx.init, params), "rng": S((2,), jnp.uint32)}


def _specs(shardings) -> dict:
  return {sharding.path_str(p): s.spec for p, s in jax.tree_util.tree_leaves_with_path(shardings)}


# ----------------------------------------------------------------------------
# State placement.
# ----------------------------------------------------------------------------

def test_moments_follow_their_parameter_whatever_the_anchoring():
  state = _abstract_state()
  mesh = _mesh((1, 2), ("data", "fsdp"))
  specs = _specs(sharding.state_shardings(
      state, mesh, (("^backbone/stem/", "fsdp"), (".*", "replicate")), fsdp_min_size=0))
  assert specs["params/backbone/stem/conv/kernel"] == P(None, None, None, "fsdp")
  assert specs["params/backbone/stem/norm/scale"] == P("fsdp")
  assert specs["params/backbone/block/fc/kernel"] == P()
  for name in ("backbone/stem/conv/kernel", "backbone/stem/norm/scale", "backbone/block/fc/kernel"):
    moments = {k: v for k, v in specs.items() if k.startswith("opt_state/") and k.endswith(name)}
    # Adam's mu and nu, nested under the clipping chain and the parameter group.
    assert len(moments) == 2, moments
    assert set(moments.values()) == {specs["params/" + name]}, moments
    # The anchored regex alone would not have found them.
    assert not any(re.search("^backbone/stem/", k) for k in moments)
  # BatchNorm statistics: the rules on their path without 'batch_stats/'.
  assert specs["batch_stats/backbone/stem/norm/mean"] == P("fsdp")
  # Scalars (step, optimizer counts) and the RNG are replicated.
  assert specs["step"] == P() and specs["rng"] == P()
  counts = [v for k, v in specs.items() if k.endswith("/count")]
  assert counts and set(counts) == {P()}


def test_a_bare_params_tree_is_placed_by_its_own_paths():
  params = _abstract_state()["params"]
  mesh = _mesh((1, 2), ("data", "fsdp"))
  specs = _specs(sharding.state_shardings(params, mesh, (("fc/kernel$", "fsdp"),),
                                          fsdp_min_size=0))
  assert specs["backbone/block/fc/kernel"] == P(None, "fsdp")
  assert specs["decode_head/cls/kernel"] == P()          # unmatched: replicated


def test_fsdp_shards_the_largest_divisible_dimension_above_the_threshold():
  mesh = _mesh((1, 2), ("data", "fsdp"))

  def spec(shape, rule="fsdp", min_size=0):
    return sharding.leaf_spec("x", shape, mesh, ((".*", rule),), fsdp_min_size=min_size)

  assert spec((3, 3, 64, 256)) == P(None, None, None, "fsdp")
  assert spec((3, 3, 256, 63)) == P(None, None, "fsdp")   # 63 does not divide
  assert spec((5, 6, 7)) == P(None, "fsdp")
  assert spec((64, 64)) == P(None, "fsdp")                 # equal sizes: the last
  # The threshold counts elements; smaller leaves are replicated.
  assert spec((64, 256), min_size=64 * 256) == P(None, "fsdp")
  assert spec((64, 256), min_size=64 * 256 + 1) == P()
  assert sharding.leaf_spec("x", (64, 64), mesh, ((".*", "fsdp"),)) == P()   # default 2**14
  assert sharding.DEFAULT_FSDP_MIN_SIZE == 2 ** 14
  # Other axes, several axes, explicit specs, replication.
  mesh2 = _mesh((2, 1), ("data", "fsdp"))
  assert sharding.leaf_spec("x", (6, 8), mesh2, ((".*", "fsdp:data"),), fsdp_min_size=0) == (
      P(None, "data"))
  assert sharding.leaf_spec("x", (6, 8), mesh2, ((".*", "fsdp:data,fsdp"),),
                            fsdp_min_size=0) == P(None, ("data", "fsdp"))
  assert spec((64, 256), rule=(None, "fsdp")) == P(None, "fsdp")
  assert spec((64, 256), rule=()) == P()
  assert spec((64, 256), rule="replicate") == P()
  assert spec(()) == P()                                   # scalars whatever the rule
  # First match wins.
  rules = (("kernel$", "replicate"), (".*", "fsdp"))
  assert sharding.leaf_spec("a/kernel", (64, 256), mesh, rules, fsdp_min_size=0) == P()
  assert sharding.leaf_spec("a/bias", (256,), mesh, rules, fsdp_min_size=0) == P("fsdp")


def test_the_threshold_is_read_from_the_config():
  state = _abstract_state()
  mesh = _mesh((1, 2), ("data", "fsdp"))
  config = ml_collections.ConfigDict({"sharding_rules": (("^backbone/", "fsdp"),),
                                      "fsdp_min_size": 64 * 256})
  specs = _specs(sharding.config_state_shardings(state, mesh, config))
  assert specs["params/backbone/block/fc/kernel"] == P(None, "fsdp")      # 64 x 256
  assert specs["params/backbone/stem/conv/kernel"] == P()                 # 1728 elements
  config.fsdp_min_size = 0
  specs = _specs(sharding.config_state_shardings(state, mesh, config))
  assert specs["params/backbone/stem/conv/kernel"] == P(None, None, None, "fsdp")


def test_rules_that_cannot_apply_are_errors_naming_the_leaf():
  state = _abstract_state()
  mesh = _mesh((1, 2), ("data", "fsdp"))
  place = sharding.state_shardings
  # An explicit spec whose dimension does not divide (9 classes over 2).
  with pytest.raises(ValueError, match=r"decode_head/cls/kernel .*\(None, None, None, 'fsdp'\)"
                                       r".*dimension 9 on mesh axis 'fsdp' of size 2"):
    place(state, mesh, (("cls/kernel$", (None, None, None, "fsdp")),))
  # More entries than dimensions.
  with pytest.raises(ValueError, match=r"backbone/block/fc/bias .*1 dimension"):
    place(state, mesh, (("fc/", (None, "fsdp")),))
  # 'fsdp' above the threshold without a divisible dimension.
  odd = {"params": {"head": {"odd": S((3, 5, 7), jnp.float32)}}}
  with pytest.raises(ValueError, match=r"head/odd \(3, 5, 7\).*'fsdp'.*no dimension divisible"
                                       r" by mesh axis 'fsdp' of size 2"):
    place(odd, mesh, ((".*", "fsdp"),), fsdp_min_size=0)
  assert _specs(place(odd, mesh, ((".*", "fsdp"),)))["params/head/odd"] == P()  # below 2**14
  # Unknown axes and malformed rules.
  with pytest.raises(ValueError, match=r"'fsdp:model'.*'model'.*'data': 1, 'fsdp': 2"):
    place(state, mesh, ((".*", "fsdp:model"),))
  with pytest.raises(ValueError, match="mesh axis 'fsdp'"):
    place(state, _mesh((2,), ("data",)), ((".*", "fsdp"),))
  with pytest.raises(ValueError, match="'model'"):
    place(state, mesh, ((".*", (None, "model")),))
  with pytest.raises(ValueError, match="unknown rule 'shard'"):
    place(state, mesh, ((".*", "shard"),))
  with pytest.raises(ValueError, match="int"):
    place(state, mesh, ((".*", 3),))
  with pytest.raises(ValueError, match="bad regex"):
    place(state, mesh, (("(", "fsdp"),))
  with pytest.raises(ValueError, match="pairs"):
    place(state, mesh, (".*",))


# ----------------------------------------------------------------------------
# Meshes and the batch.
# ----------------------------------------------------------------------------

def test_mesh_fills_its_minus_one_and_errors_name_the_config():
  assert dict(sharding.make_mesh(_mesh_config((-1,), ("data",))).shape) == {"data": 2}
  mesh = sharding.make_mesh(_mesh_config((-1, 2), ("data", "fsdp")))
  assert dict(mesh.shape) == {"data": 1, "fsdp": 2}
  assert mesh.axis_types == (jax.sharding.AxisType.Auto,) * 2
  one = sharding.make_mesh(_mesh_config((-1,), ("data",)), devices=jax.devices()[1:])
  assert dict(one.shape) == {"data": 1} and list(one.devices.flat) == [jax.devices()[1]]
  for shape, axes, message in (
      ((-1, -1), ("data", "fsdp"), r"config.mesh.shape=\(-1, -1\) has more than one -1"),
      ((3,), ("data",), r"config.mesh.shape=\(3,\) needs 3 devices, there are 2"),
      ((-1, 3), ("data", "fsdp"), r"config.mesh.shape=\(-1, 3\) does not fit 2 devices"),
      ((-1,), ("data", "fsdp"), r"config.mesh.shape=\(-1,\) and config.mesh.axes"),
      ((0, -1), ("data", "fsdp"), r"config.mesh.shape=\(0, -1\): sizes must be positive"),
      ((-1, 1), ("data", "data"), r"config.mesh.axes=\('data', 'data'\) names an axis twice")):
    with pytest.raises(ValueError, match=message):
      sharding.make_mesh(_mesh_config(shape, axes))


def test_batch_axes_default_to_every_mesh_axis():
  two = _mesh_config((-1, 2), ("data", "fsdp"))
  assert sharding.batch_axes(two) == ("data", "fsdp")
  assert sharding.batch_partition(two) == ("data", "fsdp")
  assert sharding.batch_partition(_mesh_config((-1,), ("data",))) == "data"
  assert sharding.batch_partition(_mesh_config((-1, 2), ("data", "fsdp"),
                                               batch_axes=("data",))) == "data"
  assert sharding.batch_partition(_mesh_config((-1, 2), ("data", "fsdp"),
                                               batch_axes="fsdp")) == "fsdp"
  mesh = sharding.make_mesh(two)
  assert sharding.batch_sharding(mesh, two).spec == P(("data", "fsdp"))
  assert sharding.batch_devices(two, mesh) == 2
  # A config without a mesh field (older callers) splits over the mesh's axes.
  legacy = ml_collections.ConfigDict({"batch_size": 8})
  assert sharding.batch_axes(legacy, mesh) == ("data", "fsdp")
  sharding.check_batch_split(legacy, mesh)
  with pytest.raises(ValueError, match=r"config.mesh.batch_axes=\('model',\)"):
    sharding.batch_axes(_mesh_config((-1,), ("data",), batch_axes=("model",)))
  with pytest.raises(ValueError, match=r"batch_axes=\(\)"):
    sharding.batch_axes(_mesh_config((-1,), ("data",), batch_axes=()))


def test_batch_split_is_checked_over_the_product_of_the_batch_axes():
  config = _mesh_config((-1, 2), ("data", "fsdp"))
  config.batch_size, config.grad_accum_steps = 3, 1
  mesh = sharding.make_mesh(config)
  with pytest.raises(ValueError, match=r"config.batch_size=3 is not divisible by the 2 devices "
                                       r"of the batch mesh axes \('data', 'fsdp'\)"):
    sharding.check_batch_split(config, mesh)
  config.batch_size, config.grad_accum_steps = 4, 4
  with pytest.raises(ValueError, match=r"config.batch_size=4 does not split into "
                                       r"grad_accum_steps=4 micro-batches"):
    sharding.check_batch_split(config, mesh)
  config.batch_size, config.grad_accum_steps = 8, 4
  sharding.check_batch_split(config, mesh)
  # Batch over 'data' only (size 1 here): any batch size splits.
  config.mesh.batch_axes, config.batch_size, config.grad_accum_steps = ("data",), 3, 1
  sharding.check_batch_split(config, mesh)


def test_loader_places_the_batch_over_the_batch_axes():
  config = _mesh_config((-1, 2), ("data", "fsdp"))
  mesh = sharding.make_mesh(config)
  batch = {"image": np.arange(4 * 3, dtype=np.uint8).reshape(4, 3)}
  out = loader.to_global(batch, mesh, axis=sharding.batch_partition(config))["image"]
  assert out.sharding.is_equivalent_to(sharding.batch_sharding(mesh, config), 2)
  assert [s.data.shape for s in out.addressable_shards] == [(2, 3), (2, 3)]
  np.testing.assert_array_equal(np.asarray(out), batch["image"])


def test_fsdp_variables_reach_the_evaluation_mesh_replicated():
  mesh = _mesh((1, 2), ("data", "fsdp"))
  x = jax.device_put(np.arange(32.0).reshape(4, 8), NamedSharding(mesh, P(None, "fsdp")))
  eval_mesh = engine_lib.eval_mesh(mesh)          # the same devices as one 'data' axis
  y = jax.device_put(x, NamedSharding(eval_mesh, P()))
  assert y.sharding.is_fully_replicated
  np.testing.assert_array_equal(np.asarray(y), np.arange(32.0).reshape(4, 8))


# ----------------------------------------------------------------------------
# Configs and the command line.
# ----------------------------------------------------------------------------

def test_defaults_replicate_over_one_data_axis():
  config = default.get_config()
  assert tuple(config.mesh.shape) == (-1,) and tuple(config.mesh.axes) == ("data",)
  assert config.mesh.batch_axes is None and config.fsdp_min_size == 2 ** 14
  assert tuple(map(tuple, config.sharding_rules)) == ((".*", "replicate"),)
  mesh = sharding.make_mesh(config)
  assert sharding.batch_partition(config) == "data"
  state = _abstract_state()
  shardings = sharding.config_state_shardings(state, mesh, config)
  assert all(s.is_fully_replicated for s in jax.tree_util.tree_leaves(shardings))


def test_command_line_overrides_of_the_mesh_and_rules_parse():
  # As a shell passes them: --config.mesh.shape='(-1,2)' etc.
  argv = ["prog", f"--config={REPO / 'experiments/configs/default.py'}",
          "--config.mesh.shape=(-1,2)", '--config.mesh.axes=("data","fsdp")',
          '--config.sharding_rules=(("conv/kernel$",(None,None,None,"fsdp")),(".*","fsdp"))',
          "--config.fsdp_min_size=1024", '--config.mesh.batch_axes=("data",)']
  values = flags.FlagValues()
  # (config_flags finds the config file in sys_argv before parsing the overrides.)
  config_flags.DEFINE_config_file("config", flag_values=values, lock_config=True,
                                  sys_argv=argv)
  values(argv)
  config = values.config
  assert config.mesh.shape == (-1, 2) and config.mesh.axes == ("data", "fsdp")
  assert config.sharding_rules == (("conv/kernel$", (None, None, None, "fsdp")), (".*", "fsdp"))
  assert config.fsdp_min_size == 1024 and config.mesh.batch_axes == ("data",)
  mesh = sharding.make_mesh(config)
  assert dict(mesh.shape) == {"data": 1, "fsdp": 2}
  assert sharding.batch_partition(config) == "data"
  specs = _specs(sharding.config_state_shardings(_abstract_state(), mesh, config))
  assert specs["params/backbone/stem/conv/kernel"] == P(None, None, None, "fsdp")


# ----------------------------------------------------------------------------
# BatchNorm, the ahead-of-time check and training across device counts.
# ----------------------------------------------------------------------------

def _two_different_halves():
  """A batch of 4 whose halves (one per device of 2) have different statistics,
  and a BatchNorm with its variables."""
  rng = np.random.default_rng(0)
  x = np.concatenate([rng.normal(0.0, 1.0, (2, 4, 4, 3)), rng.normal(5.0, 2.0, (2, 4, 4, 3))])
  x = x.astype(np.float32)
  bn = layers.BatchNorm()
  return x, bn, bn.init(jax.random.PRNGKey(0), x)


def test_batchnorm_statistics_cover_the_global_batch_when_sharded():
  mesh = _mesh((2,), ("data",))
  # The two devices' halves differ: per-device statistics would not match.
  x, bn, variables = _two_different_halves()

  @jax.jit
  def step(x):
    y, new = bn.apply(variables, x, train=True, mutable=["batch_stats"])
    return y, new["batch_stats"]

  y1, stats1 = step(x)
  xs = jax.device_put(x, NamedSharding(mesh, P("data")))
  assert [s.data.shape[0] for s in xs.addressable_shards] == [2, 2]
  y2, stats2 = step(xs)
  np.testing.assert_allclose(stats2["mean"], stats1["mean"], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(stats2["var"], stats1["var"], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(y2, y1, rtol=1e-5, atol=1e-5)
  # The running mean moved by 0.1 x the global batch mean, not a half's.
  np.testing.assert_allclose(stats2["mean"], 0.1 * x.mean((0, 1, 2)), rtol=1e-5, atol=1e-6)
  assert not np.allclose(stats2["mean"], 0.1 * x[:2].mean((0, 1, 2)), atol=1e-2)


def test_per_device_batchnorm_statistics_use_each_devices_examples_only():
  mesh = _mesh((2,), ("data",))
  x, bn, variables = _two_different_halves()

  @jax.jit
  def step(x):
    with layers.batch_stat_groups(2):
      y, new = bn.apply(variables, x, train=True, mutable=["batch_stats"])
    return y, new["batch_stats"]

  y, stats = step(jax.device_put(x, NamedSharding(mesh, P("data"))))
  for half in (slice(0, 2), slice(2, 4)):      # each device normalised with its own halves
    part = x[half]
    ref = (part - part.mean((0, 1, 2))) / np.sqrt(part.var((0, 1, 2)) + 1e-5)
    np.testing.assert_allclose(np.asarray(y)[half], ref, rtol=1e-4, atol=1e-4)
  halves_mean = (x[:2].mean((0, 1, 2)) + x[2:].mean((0, 1, 2))) / 2
  np.testing.assert_allclose(stats["mean"], 0.1 * halves_mean, rtol=1e-5, atol=1e-6)
  # The trainer picks the groups from the config and the mesh.
  config = default.get_config("tiny")
  config.batchnorm_statistics = "per_device"
  model = construction.create_model(config, 9)
  tx, schedule = optax.sgd(0.0), optax.constant_schedule(0.0)
  train.config_train_step(config, model, tx, lambda *a, **k: (0.0, {}), schedule, mesh)
  config.batchnorm_statistics = "per_host"
  with pytest.raises(ValueError, match="batchnorm_statistics='per_host'"):
    train.config_train_step(config, model, tx, lambda *a, **k: (0.0, {}), schedule, mesh)


def test_aot_compiles_an_fsdp_placement_with_the_batch_over_both_axes():
  config = default.get_config("tiny")
  config.batch_size = 4
  config.data.crop_size = (32, 32)
  config.mesh.shape, config.mesh.axes = (1, 2), ("data", "fsdp")
  config.sharding_rules = ((".*", "fsdp"),)
  config.fsdp_min_size = 1024
  mesh = aot.make_target_mesh(jax.devices()[:2], (1, 2), ("data", "fsdp"))
  result = aot.analyze(config, mesh)
  assert result["batch_axes"] == ["data", "fsdp"] and result["per_device_batch"] == 2
  assert result["sharded_leaves"] > 0
  assert result["memory"]["batch"] == 2 * 32 * 32 * 4 + 2 * 2 * 4     # 2 examples per device
  # Replicated, the state would hold the parameters and two Adam moments whole.
  model = construction.create_model(config, 9)
  params = jax.eval_shape(functools.partial(construction.init_variables, model, config),
                          jax.random.PRNGKey(0))["params"]
  replicated = 3 * sum(x.size * 4 for x in jax.tree_util.tree_leaves(params))
  assert result["memory"]["state"] < 0.75 * replicated
  assert "leaves sharded" in aot.format_report(result)


@pytest.mark.slow
def test_training_agrees_on_1_2_4_8_devices_replicated_and_fsdp():
  # 8 fake CPU devices need their own process; XLA's backend optimisations are
  # off to keep the 7 compilations short (the partitioning passes still run).
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=8 "
                       "--xla_backend_optimization_level=0 "
                       "--xla_llvm_disable_expensive_passes=true")
  proc = subprocess.run([sys.executable, str(REPO / "tests" / "sharding_agreement.py"),
                         "--model=tiny"], cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=900)
  print(proc.stdout)
  assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
  assert "all settings agree" in proc.stdout
  assert proc.stdout.count("leaves sharded") == 7 and "8 = 4 data x 2 fsdp" in proc.stdout
