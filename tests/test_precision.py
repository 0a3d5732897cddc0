"""Precision and memory: bf16 compute with float32 state for every model family,
gradient accumulation, backbone rematerialisation, the uint8 host->device path
and the ahead-of-time memory check.

Large models are checked on their traced (``jax.make_jaxpr``) train step, which
gives every output's dtype and every convolution/matmul's operand dtypes without
compiling; the tiny model runs a real compiled bf16 step.
"""

from __future__ import annotations

import collections
import functools
import math
import re

import flax.linen as nn
import jax
from jax.extend import core as jax_core
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np
import optax
import pytest

from experiments.configs import common, default
from input_pipeline import loader
from offseg_jax import losses, optim, sharding, train
from offseg_jax.models import classifiers, compose, construction, layers, segmentor
from offseg_jax.registry import MODELS
from offseg_jax.tools import aot

CROP = 64


# ----------------------------------------------------------------------------
# Families: one (small) preset per backbone-module x parts combination.
# ----------------------------------------------------------------------------

_SIZE_WORDS = {"nano": 0, "tiny": 1, "t": 1, "small": 2, "s": 2, "base": 3, "b": 3,
               "large": 4, "l": 4}


def _family(name: str) -> tuple:
  """Presets of one family share a backbone module and the other parts' names."""
  spec = compose.COMPOSITIONS.get(name)
  if not spec or not spec.get("backbone"):
    return ("model", MODELS.get(name).builder.__module__, name)
  key = []
  for slot, registry in compose.SLOTS.items():
    if spec.get(slot):
      part = spec[slot][0]
      key.append((slot, registry.get(part).builder.__module__ if slot == "backbone" else part))
  return tuple(key)


def _size_key(name: str):
  """Smallest first: 'nano' < 't' < 's' < 'b' < 'l', 'b0' < 'b1', 'r18' < 'r50'."""
  tokens = [t for t in name.split("_") if t != "ol"]
  last = tokens[-1] if len(tokens) > 1 else ""
  digits = re.fullmatch(r"[a-z]*?(\d+)", last)
  if digits:
    return (0, int(digits.group(1)), name)
  if last in _SIZE_WORDS:
    return (0, _SIZE_WORDS[last], name)
  return (1, 0, name)


def family_presets() -> list[str]:
  """One preset per family registered now (families may be added at any time)."""
  groups = collections.defaultdict(list)
  for name in MODELS.names():
    if name.startswith("test_"):      # models other test modules register for themselves
      continue
    groups[_family(name)].append(name)
  return sorted(min(names, key=_size_key) for names in groups.values())


def _config(name: str, dtype: str = "bfloat16", crop: int = CROP):
  c = default.get_config("tiny")
  c.model = common.model_config(name)
  c.model.dtype = dtype
  c.data.crop_size = (crop, crop)
  c.batch_size = 2
  return c


def _abstract_training(config, num_classes: int = 9):
  """(model, train step, abstract state, abstract uint8 batch) of ``config``."""
  model = construction.create_model(config, num_classes)
  rng = jax.random.PRNGKey(0)
  variables = jax.eval_shape(functools.partial(construction.init_variables, model, config), rng)
  tx, schedule = optim.build_optimizer(config, variables["params"])
  loss_fn = losses.build_loss({k: dict(v) for k, v in config.losses.items()})
  state = jax.eval_shape(train.make_init_state(model, config, tx, rng), rng)
  batch = {k: jax.ShapeDtypeStruct(shape, dtype)
           for k, (shape, dtype) in loader.batch_spec(config).items()}
  step = train.config_train_step(config, model, tx, loss_fn, schedule)
  return model, step, state, batch


def _sub_jaxprs(eqn):
  for value in eqn.params.values():
    for v in value if isinstance(value, (list, tuple)) else (value,):
      if isinstance(v, jax_core.ClosedJaxpr):
        yield v.jaxpr
      elif isinstance(v, jax_core.Jaxpr):
        yield v


def matmul_flops_by_dtype(jaxpr, acc=None) -> dict[str, float]:
  """FLOPs of every convolution and dot_general, keyed by operand dtypes."""
  acc = collections.Counter() if acc is None else acc
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name in ("dot_general", "conv_general_dilated"):
      lhs, rhs = eqn.invars[0].aval, eqn.invars[1].aval
      out = eqn.outvars[0].aval
      if name == "dot_general":
        (contract, _), _ = eqn.params["dimension_numbers"]
        per_output = math.prod(lhs.shape[i] for i in contract)
      else:
        rhs_spec = eqn.params["dimension_numbers"].rhs_spec   # (out, in, *spatial)
        per_output = math.prod(rhs.shape[i] for i in rhs_spec[1:])
      kind = "bfloat16" if lhs.dtype == rhs.dtype == jnp.bfloat16 else f"{lhs.dtype}x{rhs.dtype}"
      acc[kind] += 2.0 * math.prod(out.shape) * per_output
    for sub in _sub_jaxprs(eqn):
      matmul_flops_by_dtype(sub, acc)
  return acc


@pytest.mark.slow                 # traces every family's full train step (~5-40 s each)
@pytest.mark.parametrize("name", family_presets())
def test_bf16_train_step_of_every_family_keeps_float32_state(name):
  config = _config(name)
  _, step, state, batch = _abstract_training(config)
  closed, (new_state, metrics) = jax.make_jaxpr(step, return_shape=True)(state, batch)
  # Parameters, BatchNorm statistics and the optimizer's moments stay float32.
  for part in ("params", "batch_stats", "opt_state"):
    for path, leaf in jax.tree_util.tree_flatten_with_path(new_state[part])[0]:
      if jnp.issubdtype(leaf.dtype, jnp.floating):
        assert leaf.dtype == jnp.float32, (part, jax.tree_util.keystr(path), leaf.dtype)
  for key, value in metrics.items():
    assert value.dtype == jnp.float32, (key, value.dtype)
  # ... while the convolutions and matmuls run in bf16 (SegNeXt's NMF is float32
  # by design, a small share of the FLOPs).
  flops = matmul_flops_by_dtype(closed.jaxpr)
  total = sum(flops.values())
  assert total > 0
  assert flops["bfloat16"] / total >= 0.9, dict(flops)


def _host_initialised_state(model, config, tx):
  """A train state of ``model`` with random float32 parameters drawn on the host.

  Same structure and dtypes as ``train.make_init_state`` (checked), without
  compiling the initialiser, which costs more than the step on 2 CPU cores.
  """
  rng = np.random.default_rng(0)
  key = jax.random.PRNGKey(0)
  abstract = jax.eval_shape(train.make_init_state(model, config, tx, key), key)
  params = jax.tree_util.tree_map(
      lambda s: rng.normal(0.0, 0.1, s.shape).astype(s.dtype), abstract["params"])
  stats = jax.tree_util.tree_map_with_path(
      lambda path, s: np.full(s.shape, "var" in jax.tree_util.keystr(path), s.dtype),
      abstract["batch_stats"])
  state = {"step": np.int32(0), "params": params, "batch_stats": stats,
           "opt_state": tx.init(params), "rng": key}
  assert (jax.tree_util.tree_structure(state) == jax.tree_util.tree_structure(abstract))
  return state


def test_bf16_step_runs_and_the_float32_default_is_unchanged():
  config = _config("tiny", crop=32)
  model = construction.create_model(config, 9)
  tx, schedule = optax.adamw(1e-3), optax.constant_schedule(1e-3)
  loss_fn = losses.build_loss({"cross_entropy": {}})
  state = _host_initialised_state(model, config, tx)
  rng = np.random.default_rng(0)
  batch = {"image": rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8),
           "label": rng.integers(0, 9, (2, 32, 32), dtype=np.uint8),
           "valid_hw": np.full((2, 2), 32, np.int32)}
  new_state, metrics = jax.jit(train.config_train_step(config, model, tx, loss_fn, schedule))(
      state, batch)
  assert np.isfinite(float(metrics["loss"])) and metrics["loss"].dtype == jnp.float32
  leaves = jax.tree_util.tree_leaves((new_state["params"], new_state["opt_state"],
                                      new_state["batch_stats"]))
  assert all(x.dtype == jnp.float32 for x in leaves if jnp.issubdtype(x.dtype, jnp.floating))
  moved = jax.tree_util.tree_map(lambda a, b: float(jnp.abs(a - b).max()),
                                 state["params"], new_state["params"])
  assert max(jax.tree_util.tree_leaves(moved)) > 0
  # The experiments compute in float32 unless asked.
  assert default.get_config().model.dtype == "float32"


def test_offset_learning_einsums_follow_the_compute_dtype():
  def dots(dtype):
    ol = classifiers.OffsetLearning(5, dtype=dtype)
    x = jnp.ones((1, 4, 4, 8), dtype)
    variables = jax.eval_shape(ol.init, jax.random.PRNGKey(0), x)
    jaxpr = jax.make_jaxpr(ol.apply)(variables, x).jaxpr
    found = []

    def walk(j):
      for eqn in j.eqns:
        if eqn.primitive.name == "dot_general":
          found.append((eqn.invars[0].aval.dtype, eqn.params["precision"]))
        for sub in _sub_jaxprs(eqn):
          walk(sub)
    walk(jaxpr)
    return found

  f32, bf16 = dots(jnp.float32), dots(jnp.bfloat16)
  assert len(f32) == len(bf16) >= 4
  # float32 keeps the parity setting (HIGHEST: no reduced-precision passes on
  # accelerators); bf16 computes in bf16 at the default precision.
  # The four einsums (the two Linear projections use the default precision).
  assert sum("HIGHEST" in str(p) for _, p in f32) == 4
  assert all(d == jnp.float32 for d, _ in f32)
  assert all(d == jnp.bfloat16 and "HIGHEST" not in str(p) for d, p in bf16)


# ----------------------------------------------------------------------------
# Gradient accumulation.
# ----------------------------------------------------------------------------

class _GNBackbone(nn.Module):
  """A BatchNorm-free conv backbone (GroupNorm), strides 2 and 4."""
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    a = layers.ConvModule(16, 3, 2, 1, norm="gn", num_groups=4, dtype=self.dtype, name="a")(x)
    b = layers.ConvModule(24, 3, 2, 1, norm="gn", num_groups=4, dtype=self.dtype, name="b")(a)
    return a, b


class _GNHead(nn.Module):
  num_classes: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, feats, train: bool = False):
    x = jnp.concatenate([feats[0], layers.resize_bilinear(feats[1], feats[0].shape[1:3])], -1)
    x = layers.ConvModule(16, 3, 1, 1, norm="gn", num_groups=4, dtype=self.dtype, name="fuse")(x)
    return classifiers.classify(x, kind="conv", num_classes=self.num_classes,
                                dropout_ratio=0.0, train=train, dtype=self.dtype), {}


def _sharded_step(step, mesh):
  repl, data = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  return jax.jit(step, in_shardings=(repl, data), out_shardings=(repl, repl))


def test_accumulated_micro_batches_equal_one_large_batch():
  model = segmentor.EncoderDecoder(backbone=_GNBackbone(), decode_head=_GNHead(5))
  config = _config("tiny", dtype="float32", crop=32)
  config.batch_size = 8
  rng = np.random.default_rng(1)
  batch = {"image": rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8),
           "label": rng.integers(0, 5, (8, 32, 32), dtype=np.uint8),
           "valid_hw": np.tile(np.int32([[32, 32]]), (8, 1))}
  batch["label"][:, :4] = 255                             # ignored rows count as in mmseg
  batch["valid_hw"][3] = (20, 28)                         # one padded example
  # SGD with lr 1: the parameter change is exactly minus the gradient.
  tx, schedule = optax.sgd(1.0), optax.constant_schedule(1.0)
  loss_fn = losses.build_loss({"cross_entropy": {"avg_non_ignore": False}})
  state = jax.jit(train.make_init_state(model, config, tx, jax.random.PRNGKey(0)))(
      jax.random.PRNGKey(0))
  mesh = jax.make_mesh((2,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  mean, std = tuple(config.data.mean), tuple(config.data.std)
  results = {}
  for k in (1, 4):
    step = train.make_train_step(model, tx, loss_fn, schedule, grad_accum_steps=k,
                                 mean=mean, std=std)
    gbatch = loader.to_global(batch, mesh)
    results[k] = jax.device_get(_sharded_step(step, mesh)(state, gbatch))
  (ref_state, ref_metrics) = results[1]
  ref_delta = jax.tree_util.tree_map(np.subtract, ref_state["params"],
                                     jax.device_get(state["params"]))
  for k in (4,):
    new_state, metrics = results[k]
    np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-6)
    np.testing.assert_allclose(metrics["grad_norm"], ref_metrics["grad_norm"], rtol=1e-5)
    delta = jax.tree_util.tree_map(np.subtract, new_state["params"],
                                   jax.device_get(state["params"]))
    for a, b in zip(jax.tree_util.tree_leaves(delta), jax.tree_util.tree_leaves(ref_delta)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
  # A batch that does not split into the micro-batches is refused.
  step = train.make_train_step(model, tx, loss_fn, schedule, grad_accum_steps=3,
                               mean=mean, std=std)
  with pytest.raises(ValueError, match="grad_accum_steps=3"):
    jax.eval_shape(step, state, batch)
  with pytest.raises(ValueError, match="micro-batches"):
    sharding.check_batch_split(ml_collections.ConfigDict({"batch_size": 8, "grad_accum_steps": 3}),
                               mesh)


# ----------------------------------------------------------------------------
# Rematerialisation.
# ----------------------------------------------------------------------------

def test_remat_backbone_keeps_names_and_gradients():
  config = _config("tiny", "float32", 32)
  assert not construction.create_model(config, 5).remat
  config.model.remat = True
  assert construction.create_model(config, 5).remat            # the config field reaches the model
  plain = segmentor.EncoderDecoder(backbone=_GNBackbone(), decode_head=_GNHead(5))
  remat = segmentor.with_remat(plain)
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 16, 16, 3))
  variables = plain.init(jax.random.PRNGKey(0), x)
  assert (jax.tree_util.tree_structure(remat.init(jax.random.PRNGKey(0), x))
          == jax.tree_util.tree_structure(variables))

  def loss(model, params):
    logits, _ = model.apply({"params": params}, x, train=True)
    return jnp.mean(logits ** 2)

  grads = [jax.jit(jax.grad(functools.partial(loss, m)))(variables["params"])
           for m in (plain, remat)]
  for a, b in zip(*(jax.tree_util.tree_leaves(g) for g in grads)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  jaxpr = str(jax.make_jaxpr(jax.grad(functools.partial(loss, remat)))(variables["params"]))
  assert "remat" in jaxpr or "checkpoint" in jaxpr
  with pytest.raises(ValueError, match="EncoderDecoder"):
    segmentor.with_remat(nn.Dense(3))


# ----------------------------------------------------------------------------
# uint8 host -> device path.
# ----------------------------------------------------------------------------

def test_uint8_transfer_gives_the_float_training_batch():
  def config(transfer):
    c = default.get_config("tiny")
    c.batch_size, c.data.num_train = 4, 8
    c.data.crop_size = (72, 80)              # larger than the 64x64 images: padding
    c.data.num_threads = 1
    c.transfer_dtype = transfer
    return c

  mesh = jax.make_mesh((2,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  c8, c32 = config("uint8"), config("float32")
  it8, it32 = iter(loader.train_dataset(c8)), iter(loader.train_dataset(c32))
  to_device = jax.jit(functools.partial(loader.device_batch, mean=tuple(c8.data.mean),
                                        std=tuple(c8.data.std)))
  for _ in range(2):
    b8, b32 = next(it8), next(it32)
    assert b8["image"].dtype == np.uint8 and b8["label"].dtype == np.uint8
    assert b32["image"].dtype == np.float32 and b32["label"].dtype == np.int32
    sent8 = sum(v.nbytes for v in b8.values())
    sent32 = sum(v.nbytes for v in b32.values())
    assert sent8 * 4 <= sent32 + 4 * b8["valid_hw"].nbytes
    spec = loader.batch_spec(c8)
    assert {k: (v.shape, v.dtype) for k, v in b8.items()} == {
        k: (s, np.dtype(d)) for k, (s, d) in spec.items()}
    images, labels = jax.device_get(to_device(loader.to_global(b8, mesh)))
    np.testing.assert_array_equal(labels, b32["label"])
    # Padded pixels are exactly 0 (the mean colour) as on the host.
    np.testing.assert_array_equal(images[:, 64:], 0.0)
    np.testing.assert_array_equal(b32["image"][:, 64:], 0.0)
    # XLA divides by std as a multiply by 1/std: at most one unit in the last place.
    np.testing.assert_array_max_ulp(images, b32["image"], maxulp=1)
  it8.close()
  it32.close()
  with pytest.raises(ValueError, match="transfer_dtype"):
    loader.transfer_dtype(ml_collections.ConfigDict({"transfer_dtype": "float16"}))


# ----------------------------------------------------------------------------
# Ahead-of-time memory check.
# ----------------------------------------------------------------------------

def test_aot_compiles_the_train_step_and_reports_memory_and_flops():
  config = _config("tiny", "float32", 32)
  config.batch_size = 4
  mesh = aot.make_target_mesh(jax.devices()[:2], (2,), ("data",))
  result = aot.analyze(config, mesh)
  m = result["memory"]
  # Replicated state: params + two Adam moments (+ counters and RNG), exact.
  model = construction.create_model(config, 9)
  variables = jax.eval_shape(functools.partial(construction.init_variables, model, config),
                             jax.random.PRNGKey(0))
  param_bytes = sum(x.size * 4 for x in jax.tree_util.tree_leaves(variables["params"]))
  stats_bytes = sum(x.size * 4 for x in jax.tree_util.tree_leaves(variables["batch_stats"]))
  assert 0 <= m["state"] - (3 * param_bytes + stats_bytes) <= 1024
  # Per-device batch shard: 2 examples of uint8 image + label and their sizes.
  assert m["batch"] == 2 * 32 * 32 * 4 + 2 * 2 * 4
  assert m["arguments"] >= m["state"] + m["batch"]
  assert m["aliased"] > 0 and m["temporaries"] > 0
  assert m["peak_estimate"] == m["arguments"] + m["outputs"] - m["aliased"] + m["temporaries"]
  assert result["flops"] > 0 and result["per_device_batch"] == 2
  report = aot.format_report(result)
  for word in ("arguments", "outputs", "temporaries", "peak", "GFLOP", "data=2"):
    assert word in report
  assert aot.parse_mesh("8", 1) == (8,) and aot.parse_mesh("4,2", 2) == (4, 2)
  with pytest.raises(ValueError, match="--mesh"):
    aot.parse_mesh("8", 2)
