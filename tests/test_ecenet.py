"""ECENet decode head and its losses.

* Parity: the ``ecenet_head_swinb`` fixture (the public port run with random
  weights at Swin-B widths) through the parity tool, one jitted forward, scoring
  the logits and every intermediate the fixture stores.
* Size: 9,888,428 parameters at Swin-B widths and 150 classes, per top module as
  the fixture lists them (``jax.eval_shape``, no weights).
* Conversion: a tiny state dict written here under the port's names (from the
  port's module tree, not from our module) maps onto the head by name; the
  forward is unchanged by a round trip; missing or extra keys are named.
* Other widths (MiT-B0) with the Offset Learning classifier, a training step
  through the ECENet losses, the two readings (query ReLU, GELU form).
* Helpers (adaptive pooling bins, pixel shuffle order, token grid length) and
  both losses against numpy computations written independently here.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from offseg_jax.conversion.core import ConversionError, flax_to_torch, torch_to_flax
from offseg_jax.losses import LOSSES, build_loss
from offseg_jax.models import HEADS, ecenet_head, layers
from offseg_jax.tools import parity

SHARED = Path(os.environ.get("OFFSEG_SHARED",
                             Path(__file__).resolve().parents[1] / ".." / "shared"))
FIXTURE = SHARED / "parity" / "ecenet_head_swinb"

SWIN_B = (128, 256, 512, 1024)
MIT_B0 = (32, 64, 160, 256)


def _features(widths, size, batch=2, seed=0):
  """Random NHWC maps at strides 4, 8, 16, 32 of a ``size`` x ``size`` image."""
  rng = np.random.default_rng(seed)
  return tuple(jnp.asarray(rng.normal(size=(batch, size // s, size // s, c)), jnp.float32)
               for s, c in zip((4, 8, 16, 32), widths))


def _template(head, feats):
  specs = tuple(jax.ShapeDtypeStruct(f.shape, f.dtype) for f in feats)
  return jax.eval_shape(lambda f: head.init(jax.random.key(0), f), specs)


def _count(tree) -> int:
  return int(sum(np.prod(leaf.shape) for leaf in jax.tree.leaves(tree)))


# ----------------------------------------------------------------------------
# Parity with the public port (one jitted forward at Swin-B widths).
# ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def parity_result():
  if not FIXTURE.with_suffix(".npz").exists():
    pytest.skip(f"parity fixture not found under {SHARED} (set OFFSEG_SHARED)")
  return parity.check_fixture(FIXTURE.with_suffix(".npz"))


def test_parity_logits(parity_result):
  print(json.dumps(parity_result))
  assert parity_result["pass"], parity_result
  assert parity_result["errors"]["logits"] <= 1e-4


def test_parity_intermediates(parity_result):
  """Every other output the fixture stores (masks, FR maps, div maps, embeddings)."""
  meta = json.loads(FIXTURE.with_suffix(".json").read_text())
  stored = [k for k in meta["npz_keys"] if not k.startswith(("input/", "state/"))
            and k != "logits"]
  assert len(stored) == 17
  extra = parity_result["extra"]
  missing = [k for k in stored if k not in extra]
  assert not missing, f"the head does not produce {missing}"
  for key in stored:
    # float32 port vs torch float64 differ by up to 2e-5 on the embeddings.
    assert extra[key] <= 1e-4, (key, extra[key])


# ----------------------------------------------------------------------------
# Parameter counts.
# ----------------------------------------------------------------------------

def test_param_count_at_swin_b_widths():
  meta_path = FIXTURE.with_suffix(".json")
  meta = json.loads(meta_path.read_text()) if meta_path.exists() else None
  head = HEADS.build("ecenet_head", 150)
  variables = _template(head, _features(SWIN_B, 256, batch=1))
  assert _count(variables["params"]) == 9_888_428
  per_top = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(variables["params"])[0]:
    top = path[0].key.split(".")[0]
    per_top[top] = per_top.get(top, 0) + int(np.prod(leaf.shape))
  if meta is not None:
    assert per_top == meta["params"]["by_top_module"]
  # Offset Learning adds K*C + 2*C^2 + 2*K (C = 256) and keeps conv_seg.
  ol = HEADS.build("ecenet_head", 150, classifier="offset_learning")
  ol_count = _count(_template(ol, _features(SWIN_B, 256, batch=1))["params"])
  assert ol_count - 9_888_428 == 150 * 256 + 2 * 256 * 256 + 2 * 150


def test_bfloat16_compute_keeps_float32_params_and_logits():
  head = HEADS.build("ecenet_head", 19, channels=64, dtype=jnp.bfloat16)
  feats = _features(MIT_B0, 64)
  variables = _template(head, feats)
  assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
  logits, aux = jax.eval_shape(lambda v, f: head.apply(v, f), variables, feats)
  assert logits.dtype == jnp.float32 and logits.shape == (2, 16, 16, 19)
  assert aux["wo_mask"].dtype == jnp.float32


# ----------------------------------------------------------------------------
# A tiny state dict under the port's names.
# ----------------------------------------------------------------------------

TINY = dict(in_channels=(8, 16, 24, 32), channels=16, num_heads=2, num_classes=5,
            mlp_ratio=4, ratio=1)


def _port_state_dict(in_channels, channels, num_heads, num_classes, mlp_ratio, ratio, seed=0):
  """Random weights under the port's state-dict names and torch shapes.

  Written from the port's module tree (SegDecodingTransformer and its parts), not
  from our module: conv weights (out, in/groups, kh, kw), Linear (out, in).
  """
  rng = np.random.default_rng(seed)
  state = {}
  d, k = channels, num_classes

  def put(name, shape, scale=None):
    scale = 1 / math.sqrt(np.prod(shape[1:])) if scale is None else scale
    state[name] = rng.normal(0, scale, shape).astype(np.float32)

  def conv(name, out, inp, ks, bias):
    put(f"{name}.weight", (out, inp, ks, ks))
    if bias:
      put(f"{name}.bias", (out,), 0.1)

  def linear(name, out, inp, bias=True):
    put(f"{name}.weight", (out, inp))
    if bias:
      put(f"{name}.bias", (out,), 0.1)

  def norm(name, c, bn=False):
    state[f"{name}.weight"] = (1 + rng.normal(0, 0.1, c)).astype(np.float32)
    put(f"{name}.bias", (c,), 0.1)
    if bn:
      put(f"{name}.running_mean", (c,), 0.1)
      state[f"{name}.running_var"] = rng.uniform(0.5, 1.5, c).astype(np.float32)
      state[f"{name}.num_batches_tracked"] = np.zeros((), np.int64)

  n = len(in_channels)
  length = int(math.sqrt(k) * ratio)
  length = length if length % 2 else length + 1
  for i, c in enumerate(in_channels):
    h = c // 2
    conv(f"layer_slcts.{i}.primary.0", h, c, 1, False)
    norm(f"layer_slcts.{i}.primary.1", h, bn=True)
    conv(f"layer_slcts.{i}.cheap.0", h, 1, 3, True)
    norm(f"layer_slcts.{i}.cheap.1", h, bn=True)
    linear(f"layer_slcts.{i}.layer_channel_slct.0", h // 2, h, bias=False)
    linear(f"layer_slcts.{i}.layer_channel_slct.2", h, h // 2, bias=False)
    conv(f"layer_slcts.{i}.conv_out", c, c, 1, False)
    norm(f"norms.{i}", c)
    conv(f"laterals.{i}", d, c, 1, False)
    linear(f"token_emb.{i}.cls_learner", d, 50 + length * length)
  for i in range(n - 1):
    t = f"transfer.{i}"
    for ln in ("norm_low", "norm_high", "norm_mlp"):
      norm(f"{t}.{ln}", d)
    conv(f"{t}.cross_attn.q.depthwise_conv.conv", d, 1, 3, True)
    conv(f"{t}.cross_attn.q.pointwise_conv.conv", d, d, 1, True)
    linear(f"{t}.cross_attn.kv", 2 * d, d, bias=False)
    conv(f"{t}.cross_attn.proj", d, d, 1, True)
    conv(f"{t}.mlp.0", mlp_ratio * d, d, 1, True)
    conv(f"{t}.mlp.1", mlp_ratio * d, 1, 3, True)
    conv(f"{t}.mlp.4", d, mlp_ratio * d, 1, True)
    g = f"gated_tokens.{i}"
    linear(f"{g}.dynamic_layer", 2 * d, d)
    linear(f"{g}.input_layer", d, d)
    linear(f"{g}.update_gate", d, d)
    norm(f"{g}.norm_in", d)
    norm(f"{g}.norm_out", d)
    linear(f"{g}.fc_layer", d, d)
    norm(f"{g}.fc_norm", d)
    for j in range(i + 1):
      u = f"ghost_up_layers.{i}.layers.{j}"
      conv(f"{u}.primary.conv", 2 * d, d, 1, False)
      norm(f"{u}.primary.bn", 2 * d, bn=True)
      conv(f"{u}.cheap.conv", 2 * d, 1, 3, False)
      norm(f"{u}.cheap.bn", 2 * d, bn=True)
  conv("learner.0", d, d // num_heads, 1, False)
  conv("learner.1", k, d, 1, False)
  linear("trans", k, d)
  conv("proj.conv", d, n * d, 3, False)
  norm("proj.bn", d, bn=True)
  conv("conv_seg", k, d, 1, True)
  return state


@pytest.fixture
def native_depthwise():
  """Depthwise convs as XLA convolutions: on CPU their gradients compile ~2x faster
  than the default shifted multiply-adds, and these tests are compile-bound."""
  with layers.depthwise_impl("conv"):
    yield


@pytest.fixture(scope="module")
def tiny():
  """The tiny head, its port-named state dict and a jitted eval forward."""
  cfg = dict(TINY)
  official = dict(type="SegDecodingTransformer", in_channels=list(cfg["in_channels"]),
                  in_index=[0, 1, 2, 3], channels=cfg["channels"],
                  num_heads=cfg["num_heads"], num_classes=cfg["num_classes"],
                  mlp_ratio=cfg["mlp_ratio"], ratio=cfg["ratio"], all_levels=True,
                  ghost_up=True, mask_loss=True, div_loss=True, dropout_ratio=0.1,
                  norm_cfg=dict(type="SyncBN", requires_grad=True), act_cfg=dict(type="ReLU"),
                  ln_norm_cfg=dict(type="LN", requires_grad=True), align_corners=False,
                  loss_decode=[dict(type="CrossEntropyLoss", loss_weight=1.0)])
  entry = HEADS.get("ecenet_head")
  head = entry.from_official(official, None)
  feats = _features(cfg["in_channels"], 64, seed=1)
  state = _port_state_dict(**cfg)
  return dict(head=head, entry=entry, feats=feats, state=state,
              template=_template(head, feats), apply=jax.jit(head.apply))


def test_port_state_dict_converts_by_name_and_round_trips(tiny, native_depthwise):
  variables, report = torch_to_flax(tiny["state"], tiny["template"],
                                    ignore=tiny["entry"].torch_ignore, strict=True)
  assert not report["missing"] and not report["unexpected"]
  assert sorted(report["ignored"]) == sorted(k for k in tiny["state"]
                                             if k.endswith("num_batches_tracked"))
  logits, aux = tiny["apply"](variables, tiny["feats"])
  assert logits.shape == (2, 16, 16, 5) and np.isfinite(np.asarray(logits)).all()
  assert [m.shape for m in aux["masks"]] == [(2, 16, 16, 5), (2, 8, 8, 5), (2, 4, 4, 5),
                                             (2, 2, 2, 5)]

  exported = flax_to_torch(variables)
  kept = {k: v for k, v in tiny["state"].items() if not k.endswith("num_batches_tracked")}
  assert set(exported) == set(kept)
  for key, value in kept.items():
    np.testing.assert_array_equal(exported[key], value, err_msg=key)
  again, _ = torch_to_flax(exported, tiny["template"], strict=True)
  logits2, _ = tiny["apply"](again, tiny["feats"])
  np.testing.assert_array_equal(np.asarray(logits2), np.asarray(logits))

  # conv_seg.bias lands on the classifier: +1 on class 0 shifts only that logit.
  shifted = dict(tiny["state"])
  shifted["conv_seg.bias"] = shifted["conv_seg.bias"] + np.eye(5, dtype=np.float32)[0]
  moved, _ = torch_to_flax(shifted, tiny["template"], ignore=tiny["entry"].torch_ignore)
  delta = np.asarray(tiny["apply"](moved, tiny["feats"])[0]) - np.asarray(logits)
  np.testing.assert_allclose(delta[..., 0], 1.0, atol=1e-5)
  np.testing.assert_allclose(delta[..., 1:], 0.0, atol=1e-6)


def test_missing_and_extra_keys_are_named(tiny):
  missing = dict(tiny["state"])
  del missing["transfer.1.cross_attn.kv.weight"]
  with pytest.raises(ConversionError, match=r"transfer\.1\.cross_attn\.kv\.weight"):
    torch_to_flax(missing, tiny["template"], ignore=tiny["entry"].torch_ignore)
  extra = dict(tiny["state"])
  extra["loss_decode.2.weight"] = np.zeros(3, np.float32)
  with pytest.raises(ConversionError, match=r"loss_decode\.2\.weight"):
    torch_to_flax(extra, tiny["template"], ignore=tiny["entry"].torch_ignore)
  wrong = dict(tiny["state"])
  wrong["learner.0.weight"] = np.zeros((16, 16, 1, 1), np.float32)   # groups ignored
  with pytest.raises(ConversionError, match=r"learner\.0\.weight"):
    torch_to_flax(wrong, tiny["template"], ignore=tiny["entry"].torch_ignore)


def test_from_official_refuses_unported_options():
  base = dict(in_channels=[8, 16, 24, 32], in_index=[0, 1, 2, 3], channels=16,
              num_classes=5, ghost_up=True, norm_cfg=dict(type="SyncBN"),
              ln_norm_cfg=dict(type="LN"))
  head = ecenet_head.ecenet_head_from_official(base, 7)
  assert head.num_classes == 7 and head.ratio == pytest.approx(math.sqrt(2))
  assert head.query_relu and head.gelu_approximate
  for change, word in [(dict(ghost_up=False), "ghost_up"),
                       (dict(all_levels=False), "all_levels"),
                       (dict(act_cfg=dict(type="GELU")), "act_cfg"),
                       (dict(norm_cfg=dict(type="GN")), "norm_cfg"),
                       (dict(align_corners=True), "align_corners"),
                       (dict(use_coord=True), "use_coord"),
                       (dict(in_index=[0, 1, 2]), "in_index")]:
    with pytest.raises(ValueError, match=word):
      ecenet_head.ecenet_head_from_official(dict(base, **change), 5)


# ----------------------------------------------------------------------------
# Other widths, other classifiers, training.
# ----------------------------------------------------------------------------

def _filled(template, seed=0):
  """Fan-in-scaled random variables for a template (model.init compiles slowly)."""
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = path[-1].key
    if name == "var":
      return np.ones(leaf.shape, np.float32)
    if name == "mean":
      return np.zeros(leaf.shape, np.float32)
    std = 1 / np.sqrt(np.prod(leaf.shape[:-1])) if name == "kernel" else 0.1
    value = rng.normal(0, std, leaf.shape).astype(np.float32)
    return value + 1 if name == "scale" else value

  return jax.tree_util.tree_map_with_path(fill, template)


def test_mit_b0_widths_with_offset_learning_train_step(native_depthwise):
  """MiT-B0 widths, D=64, Offset Learning; one training step through all ECENet losses."""
  head = HEADS.build("ecenet_head", 19, channels=64, classifier="offset_learning")
  feats = _features(MIT_B0, 64, seed=2)
  variables = _filled(_template(head, feats))
  assert "offset_learning" in variables["params"] and "conv_seg" in variables["params"]
  labels = jnp.asarray(np.random.default_rng(3).integers(0, 19, (2, 64, 64)))
  labels = labels.at[:, :4].set(255)
  loss_fn = build_loss({"cross_entropy": {}, "ecenet_mask": {},
                        "ecenet_diversity": {"weight": 0.2}})

  @jax.jit
  def step(params):
    def compute(p):
      (logits, aux), new = head.apply({"params": p, "batch_stats": variables["batch_stats"]},
                                      feats, train=True, rngs={"dropout": jax.random.key(1)},
                                      mutable=["batch_stats"])
      total, terms = loss_fn(logits, aux, labels)
      return total, (terms, logits, aux, new)
    return jax.value_and_grad(compute, has_aux=True)(params)

  (total, (terms, logits, aux, new)), grads = step(variables["params"])
  assert logits.shape == (2, 16, 16, 19)
  assert [d.shape for d in aux["div"]] == [(2, 256), (2, 64), (2, 16), (2, 4)]
  assert [float(c) for c in aux["div_channels"]] == [16, 32, 80, 128]
  assert aux["wo_mask"].shape == (2, 16, 16, 19)
  assert np.isfinite(float(total))
  np.testing.assert_allclose(float(total), float(terms["cross_entropy"] + terms["ecenet_mask"]
                                                 + 0.2 * terms["ecenet_diversity"]), rtol=1e-6)
  assert 0 < float(terms["ecenet_diversity"]) < 1
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
  # The diversity and mask losses reach the FR gate and the ECE learner.
  assert np.abs(np.asarray(grads["layer_slcts.0"]["layer_channel_slct.0"]["kernel"])).max() > 0
  assert np.abs(np.asarray(grads["learner.1"]["kernel"])).max() > 0
  # Running statistics move in training mode.
  assert not np.allclose(np.asarray(new["batch_stats"]["proj"]["bn"]["mean"]), 0)


def test_readings_query_relu_and_gelu():
  """query_relu / gelu_approximate switch the two port-vs-original readings."""
  rng = np.random.default_rng(4)
  low = jnp.asarray(rng.normal(size=(1, 4, 4, 8)), jnp.float32)
  emb = jnp.asarray(rng.normal(size=(1, 3, 8)), jnp.float32)
  outs = {}
  for relu in (True, False):
    for approx in (True, False):
      layer = ecenet_head.FeatureTransferLayer(2, query_relu=relu, gelu_approximate=approx)
      variables = _filled(jax.eval_shape(layer.init, jax.random.key(0), low, emb), seed=5)
      outs[relu, approx] = np.asarray(layer.apply(variables, low, emb)[0])
  assert np.abs(outs[True, True] - outs[False, True]).max() > 1e-2      # ReLU matters
  gelu_gap = np.abs(outs[True, True] - outs[True, False]).max()
  assert 0 < gelu_gap < 1e-2                                             # tanh vs erf


# ----------------------------------------------------------------------------
# Helpers against direct re-statements of the torch definitions.
# ----------------------------------------------------------------------------

def _cross_attention_numpy(query, emb, w, num_heads, query_relu):
  """The port's MultiHeadAttention, NCHW-free, written with explicit loops."""
  b, h, wd, c = query.shape
  d = c // num_heads
  relu = (lambda x: np.maximum(x, 0)) if query_relu else (lambda x: x)
  pad = np.pad(query, ((0, 0), (1, 1), (1, 1), (0, 0)))
  dw = np.zeros_like(query)
  for i in range(3):
    for j in range(3):
      dw += pad[:, i:i + h, j:j + wd, :] * w["dw_k"][i, j, 0]
  q = relu(relu(dw + w["dw_b"]) @ w["pw_k"][0, 0] + w["pw_b"])
  kv = emb @ w["kv"]
  keys, values = kv[..., :c], kv[..., c:]
  out = np.zeros((b, h * wd, c))
  mask = np.zeros((b, h * wd, keys.shape[1]))
  for n in range(num_heads):
    sl = slice(n * d, (n + 1) * d)
    s = q.reshape(b, h * wd, c)[..., sl] @ keys[..., sl].transpose(0, 2, 1) / math.sqrt(d)
    mask += s / num_heads
    e = np.exp(s.max(-1, keepdims=True) - s)          # softmax(rowmax - S)
    a = e / e.sum(-1, keepdims=True)
    out[..., sl] = a @ values[..., sl]
  out = out @ w["proj_k"][0, 0] + w["proj_b"]
  return out.reshape(b, h, wd, c), mask.reshape(b, h, wd, -1)


@pytest.mark.parametrize("query_relu", [True, False])
def test_cross_attention_matches_numpy(query_relu):
  rng = np.random.default_rng(6)
  query = rng.normal(size=(2, 3, 4, 8)).astype(np.float32)
  emb = rng.normal(size=(2, 5, 8)).astype(np.float32)
  attn = ecenet_head.ClassCrossAttention(2, query_relu=query_relu)
  variables = _filled(jax.eval_shape(attn.init, jax.random.key(0), query, emb), seed=7)
  p = jax.tree.map(np.asarray, variables["params"])
  weights = dict(dw_k=p["q.depthwise_conv"]["conv"]["kernel"],
                 dw_b=p["q.depthwise_conv"]["conv"]["bias"],
                 pw_k=p["q.pointwise_conv"]["conv"]["kernel"],
                 pw_b=p["q.pointwise_conv"]["conv"]["bias"], kv=p["kv"]["kernel"],
                 proj_k=p["proj"]["kernel"], proj_b=p["proj"]["bias"])
  with jax.default_matmul_precision("highest"):
    out, mask = attn.apply(variables, query, emb)
  ref_out, ref_mask = _cross_attention_numpy(query.astype(np.float64), emb, weights, 2,
                                             query_relu)
  np.testing.assert_allclose(np.asarray(out), ref_out, atol=1e-4)
  np.testing.assert_allclose(np.asarray(mask), ref_mask, atol=1e-4)


@pytest.mark.parametrize("n,s", [(8, 3), (8, 13), (20, 6), (5, 5), (7, 2), (3, 1)])
def test_adaptive_avg_pool_uses_torch_bins(n, s):
  rng = np.random.default_rng(n * 100 + s)
  x = rng.normal(size=(1, n, n + 1, 2)).astype(np.float32)
  expected = np.zeros((1, s, s, 2))
  for i in range(s):
    h0, h1 = math.floor(i * n / s), math.ceil((i + 1) * n / s)
    for j in range(s):
      w0, w1 = math.floor(j * (n + 1) / s), math.ceil((j + 1) * (n + 1) / s)
      expected[0, i, j] = x[0, h0:h1, w0:w1].mean(axis=(0, 1))
  with jax.default_matmul_precision("highest"):
    np.testing.assert_allclose(np.asarray(ecenet_head.adaptive_avg_pool(x, s)), expected,
                               atol=1e-6)


def test_pixel_shuffle_uses_torch_channel_order():
  x = np.arange(2 * 3 * 2 * 12, dtype=np.float32).reshape(2, 3, 2, 12)   # C_out = 3, r = 2
  y = np.asarray(ecenet_head.pixel_shuffle(jnp.asarray(x), 2))
  assert y.shape == (2, 6, 4, 3)
  for c in range(3):
    for i in range(2):
      for j in range(2):
        np.testing.assert_array_equal(y[:, i::2, j::2, c], x[..., c * 4 + i * 2 + j])


def test_token_grid_length_table():
  # Reference section 1.3: ADE20K 13, Cityscapes 5, PASCAL-Context 7, COCO-Stuff 13.
  assert [ecenet_head.token_grid_length(k, 1) for k in (150, 19, 59, 60, 171)] == [
      13, 5, 7, 7, 13]
  assert ecenet_head.token_grid_length(150, math.sqrt(2)) == 17


# ----------------------------------------------------------------------------
# Losses against numpy.
# ----------------------------------------------------------------------------

def _mask_loss_numpy(z, labels, alpha=0.25, gamma=2.0):
  """Focal and dice sums over matched (image, class) pairs / N, by explicit loops."""
  b, _, _, k = z.shape
  focal = dice = 0.0
  pairs = 0
  for i in range(b):
    for c in range(k):
      t = (labels[i] == c).astype(np.float64)
      if t.sum() == 0:
        continue
      pairs += 1
      p = 1 / (1 + np.exp(-z[i, ..., c].astype(np.float64)))
      ce = -(t * np.log(p) + (1 - t) * np.log(1 - p))
      pt = np.where(t == 1, p, 1 - p)
      at = np.where(t == 1, alpha, 1 - alpha)
      focal += (at * (1 - pt) ** gamma * ce).mean()
      dice += 1 - (2 * (p * t).sum() + 1) / (p.sum() + t.sum() + 1)
  n = max(pairs, 1)
  return focal / n, dice / n


def _mask_case():
  rng = np.random.default_rng(8)
  z = rng.normal(0, 2, size=(3, 4, 4, 3)).astype(np.float32)
  labels = np.array([
      [[0, 0, 2, 2], [0, 0, 2, 2], [255, 255, 2, 2], [0, 0, 0, 255]],  # classes 0, 2
      [[255] * 4] * 4,                                                 # nothing valid
      [[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 1], [1, 1, 1, 1]],        # classes 0, 1
  ], np.int32)
  return z, labels


def test_mask_loss_matches_numpy():
  z, labels = _mask_case()
  focal, dice = _mask_loss_numpy(z, labels)
  aux = {"wo_mask": jnp.asarray(z)}
  fn = LOSSES["ecenet_mask"]
  got_focal = float(fn(None, aux, jnp.asarray(labels), mask_weight=1.0, dice_weight=0.0))
  got_dice = float(fn(None, aux, jnp.asarray(labels), mask_weight=0.0, dice_weight=1.0))
  np.testing.assert_allclose(got_focal, focal, rtol=1e-5)
  np.testing.assert_allclose(got_dice, dice, rtol=1e-5)
  np.testing.assert_allclose(float(fn(None, aux, jnp.asarray(labels))), 5 * focal + 2 * dice,
                             rtol=1e-5)
  # Absent classes are not supervised: their logits do not matter.
  moved = z.copy()
  moved[0, ..., 1] += 10
  np.testing.assert_allclose(float(fn(None, {"wo_mask": jnp.asarray(moved)},
                                      jnp.asarray(labels))), 5 * focal + 2 * dice, rtol=1e-5)
  # Ignored pixels are negatives of the supervised classes: their logits matter.
  moved = z.copy()
  moved[0, 2, 0, 0] += 3
  assert abs(float(fn(None, {"wo_mask": jnp.asarray(moved)}, jnp.asarray(labels)))
             - (5 * focal + 2 * dice)) > 1e-3
  # No valid pixel anywhere: zero, not NaN.
  assert float(fn(None, aux, jnp.full_like(jnp.asarray(labels), 255))) == 0.0


def test_mask_loss_resizes_to_the_labels_and_is_global_under_sharding():
  z, labels = _mask_case()
  z, labels = z[:2], labels[:2]
  coarse = jnp.asarray(z[:, ::2, ::2])
  full = layers.resize_bilinear(coarse, (4, 4))
  fn = LOSSES["ecenet_mask"]
  np.testing.assert_allclose(float(fn(None, {"wo_mask": coarse}, jnp.asarray(labels))),
                             float(fn(None, {"wo_mask": full}, jnp.asarray(labels))), rtol=1e-6)
  # One image per device: the normaliser still counts the pairs of both images.
  mesh = Mesh(np.array(jax.devices()[:2]), ("data",))
  shard = NamedSharding(mesh, P("data"))
  sharded = jax.jit(lambda a, l: fn(None, {"wo_mask": a}, l))(
      jax.device_put(jnp.asarray(z), shard), jax.device_put(jnp.asarray(labels), shard))
  focal, dice = _mask_loss_numpy(z, labels)
  np.testing.assert_allclose(float(sharded), 5 * focal + 2 * dice, rtol=1e-5)


def test_diversity_loss_matches_numpy():
  rng = np.random.default_rng(9)
  gated = [rng.normal(0, 3, size=(2, 4, 4, 6)), rng.normal(0, 3, size=(2, 2, 2, 10))]
  maps, expected = [], []
  for g in gated:
    flat = g.reshape(2, -1, g.shape[-1])
    soft = np.exp(flat - flat.max(1, keepdims=True))
    soft /= soft.sum(1, keepdims=True)                  # softmax over positions
    m = soft.max(-1)                                    # max over channels
    maps.append(jnp.asarray(m, jnp.float32))
    expected.append(1 - m.sum(-1).mean() / g.shape[-1])
  aux = {"div": tuple(maps), "div_channels": (6.0, 10.0)}
  got = float(LOSSES["ecenet_diversity"](None, aux, None))
  np.testing.assert_allclose(got, np.mean(expected), rtol=1e-5)
  # Identical channels: d = 1, the loss is 1 - 1/C' per level.
  same = np.full((1, 16), 1 / 16)
  aux = {"div": (jnp.asarray(same),), "div_channels": (4.0,)}
  np.testing.assert_allclose(float(LOSSES["ecenet_diversity"](None, aux, None)), 0.75,
                             rtol=1e-6)
  # The weight comes from the config.
  total, terms = build_loss({"ecenet_diversity": {"weight": 0.2}})(None, aux, None)
  np.testing.assert_allclose(float(total), 0.2 * float(terms["ecenet_diversity"]), rtol=1e-6)


def test_a_port_checkpoint_converts_and_evaluates_through_the_commands(tmp_path):
  """A checkpoint under the port's names (mmseg MiT backbone.*, decode_head.*)
  goes through ``offseg_jax.convert`` and ``offseg_jax.evaluate`` unchanged."""
  import subprocess
  import sys
  from experiments.configs import ecenet as ecenet_configs
  from offseg_jax import convert
  from offseg_jax.conversion import variables_io
  from offseg_jax.models import construction
  from test_conversion import write_torch_file   # the torch-free torch.save writer

  config = ecenet_configs.get_config("mit_b0,synthetic")
  model = construction.create_model(config, 9)
  shapes = jax.eval_shape(lambda k: construction.init_variables(model, config, k),
                          jax.random.PRNGKey(3))
  rng = np.random.default_rng(3)      # random weights without compiling the init
  variables = jax.tree.map(
      lambda s: (rng.uniform(0.5, 1.5, s.shape) if s.ndim == 1 else
                 rng.normal(0.0, 0.05, s.shape)).astype(s.dtype), shapes)
  state = flax_to_torch(variables)
  assert "backbone.layers.0.0.projection.weight" in state       # mmseg MiT names
  assert "decode_head.conv_seg.weight" in state
  state = {k: np.asarray(v) for k, v in state.items()}
  write_torch_file(tmp_path / "ecenet_port.pth", {"state_dict": state, "meta": {"iter": 1}})

  out = tmp_path / "converted"
  assert convert.main(["--model", "ecenet_mit_b0", "--num-classes", "9",
                       str(tmp_path / "ecenet_port.pth"), str(out)]) == 0
  report = variables_io.load_meta(out)["report"]
  assert report["missing"] == [] and report["unexpected"] == []
  loaded = variables_io.load_variables(out, target=shapes)
  for a, b in zip(jax.tree_util.tree_leaves(loaded), jax.tree_util.tree_leaves(variables)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  repo = Path(__file__).resolve().parents[1]
  proc = subprocess.run(
      [sys.executable, "-m", "offseg_jax.evaluate",
       "--config=experiments/configs/ecenet.py:mit_b0,synthetic", f"--checkpoint={out}",
       f"--output={tmp_path / 'eval'}", "--config.data.num_val=4", "--config.eval.batch_size=2",
       "--num_samples=0"],
      cwd=repo, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
      timeout=600)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
  metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
  assert 0.0 <= metrics["mIoU"] <= 100.0 and len(metrics["per_class"]) == 9
