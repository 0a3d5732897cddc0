"""FRM: the DNL block (parity), the FRM neck, its pooling, the projection head and
the pixel-contrastive loss (against numpy computations written out here)."""

import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from offseg_jax import losses
from offseg_jax.losses import contrastive
from offseg_jax.models import frm
from offseg_jax.registry import BLOCKS, NECKS
from offseg_jax.tools import parity

REPO = Path(__file__).resolve().parents[1]
PARITY = Path(os.environ.get("OFFSEG_SHARED", REPO.parent / "shared")) / "parity"

# Backbone maps of a 100 x 76 image through a stride-4 then three stride-2 convs
# (ceil sizes at every stage): none of the pooled levels divides evenly.
ODD_SIZES = ((25, 19), (13, 10), (7, 5), (4, 3))
WIDTHS = (8, 16, 24, 32)


def _features(seed=0, batch=2):
  rng = np.random.default_rng(seed)
  return tuple(jnp.asarray(rng.normal(size=(batch, h, w, c)), jnp.float32)
               for (h, w), c in zip(ODD_SIZES, WIDTHS))


# ---------------------------------------------------------------------------
# DNL block.
# ---------------------------------------------------------------------------

def test_dnl_block_parity_fixture():
  path = PARITY / "dnl_block.npz"
  if not path.exists():
    pytest.skip(f"parity fixture {path} not found")
  result = parity.check_fixture(path)
  print(f"dnl_block output max abs err {result['errors']['output']:.3g}")
  assert result["pass"], result
  assert result["errors"]["output"] <= result["tolerances"]["output"]


def test_dnl_block_parameter_count_matches_fixture():
  meta_path = PARITY / "dnl_block.json"
  if not meta_path.exists():
    pytest.skip(f"{meta_path} not found")
  meta = json.loads(meta_path.read_text())
  module = BLOCKS.get("dnl_block").from_official(meta["parity"]["official_config"], None)
  x = jnp.zeros((1, 16, 32, 256))
  variables = jax.eval_shape(module.init, jax.random.key(0), x)
  count = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(variables["params"]))
  assert count == meta["params"]["num_params"] == 132225


def test_dnl_from_official_refuses_unported_options():
  entry = BLOCKS.get("dnl_block")
  with pytest.raises(ValueError, match="mode"):
    entry.from_official({"type": "DNLHead", "mode": "gaussian"}, 19)
  with pytest.raises(ValueError, match="sub_sample"):
    entry.from_official({"type": "DNLHead", "sub_sample": True}, 19)
  with pytest.raises(ValueError, match="GN"):
    entry.from_official({"type": "DNLHead", "norm_cfg": {"type": "GN"}}, 19)
  block = entry.from_official({"type": "DNLHead", "temperature": 0.1, "reduction": 4}, 19)
  assert (block.temperature, block.reduction, block.norm) == (0.1, 4, None)


def test_dnl_block_formula_without_norm_against_numpy():
  """The whitened pairwise term, the unary term and conv_out, written out in numpy."""
  rng = np.random.default_rng(1)
  x = rng.normal(size=(2, 3, 5, 8)).astype(np.float32)
  block = frm.DisentangledNonLocal(reduction=2, temperature=0.2, norm=None)
  variables = jax.jit(block.init)(jax.random.key(0), jnp.asarray(x))
  # Random weights everywhere (conv_out starts at zero otherwise).
  variables = jax.tree.map(lambda v: jnp.asarray(rng.normal(size=v.shape) * 0.3, jnp.float32),
                           variables)
  out = np.asarray(jax.jit(block.apply)(variables, jnp.asarray(x)))
  p = jax.tree.map(np.asarray, variables["params"])

  def conv(name, t):
    return t @ p[name]["conv"]["kernel"][0, 0] + p[name]["conv"]["bias"]

  t = x.reshape(2, 15, 8)
  g, theta, phi = conv("g", t), conv("theta", t), conv("phi", t)
  theta = theta - theta.mean(1, keepdims=True)
  phi = phi - phi.mean(1, keepdims=True)
  logits = theta @ phi.transpose(0, 2, 1) / np.sqrt(4) / 0.2
  pair = np.exp(logits - logits.max(-1, keepdims=True))
  pair /= pair.sum(-1, keepdims=True)
  m = (t @ p["conv_mask"]["kernel"][0, 0] + p["conv_mask"]["bias"])[..., 0]
  u = np.exp(m - m.max(-1, keepdims=True))
  u /= u.sum(-1, keepdims=True)
  y = pair @ g + (u[:, None, :] @ g)
  ref = t + conv("conv_out", y)
  np.testing.assert_allclose(out.reshape(2, 15, 8), ref, rtol=1e-4, atol=1e-4)


def test_dnl_block_starts_as_identity():
  x = jnp.asarray(np.random.default_rng(2).normal(size=(1, 4, 6, 16)), jnp.float32)
  block = frm.DisentangledNonLocal()
  variables = jax.jit(block.init)(jax.random.key(0), x)
  np.testing.assert_array_equal(np.asarray(jax.jit(block.apply)(variables, x)), np.asarray(x))


# ---------------------------------------------------------------------------
# Pooling to the 1/32 grid.
# ---------------------------------------------------------------------------

def _numpy_polyphase(x, s, size, p=2.0):
  b, h, w, c = x.shape
  th, tw = size
  padded = np.zeros((b, th * s, tw * s, c), x.dtype)
  padded[:, :min(h, th * s), :min(w, tw * s)] = x[:, :th * s, :tw * s]
  out = np.empty((b, th, tw, c), x.dtype)
  for n in range(b):
    best, best_score = None, -1.0
    for i in range(s):
      for j in range(s):
        comp = padded[n, i::s, j::s]
        score = np.sum(np.abs(comp.astype(np.float64)) ** p)
        if score > best_score:
          best, best_score = comp, score
    out[n] = best
  return out


def _numpy_avg(x, s, size):
  b, h, w, c = x.shape
  out = np.zeros((b, size[0], size[1], c), np.float64)
  for i in range(size[0]):
    for j in range(size[1]):
      win = x[:, i * s:(i + 1) * s, j * s:(j + 1) * s]
      if win.shape[1] and win.shape[2]:
        out[:, i, j] = win.mean(axis=(1, 2))
  return out


@pytest.mark.parametrize("p", [2.0, 1.0])
def test_polyphase_pool_matches_numpy(p):
  rng = np.random.default_rng(3)
  x = rng.normal(size=(3, 25, 19, 5)).astype(np.float32)
  # Make one phase dominate in sample 1 and another in sample 2, so the chosen
  # component differs across the batch.
  x[1, 3::8, 5::8] *= 10.0
  x[2, 7::8, 0::8] *= 10.0
  ours = np.asarray(frm.polyphase_pool(jnp.asarray(x), 8, (4, 3), p))
  ref = _numpy_polyphase(x, 8, (4, 3), p)
  np.testing.assert_array_equal(ours, ref)
  # Sample 1 keeps phase (3, 5): 3 x 2 pixels of the 25 x 19 map, zero padding after.
  np.testing.assert_array_equal(ours[1, :3, :2], x[1, 3::8, 5::8])
  assert not ours[1, 3:].any() and not ours[1, :, 2:].any()


def test_avg_pool_matches_numpy_ceil_mode():
  x = np.random.default_rng(4).normal(size=(2, 13, 10, 3)).astype(np.float32)
  ours = np.asarray(frm.avg_pool(jnp.asarray(x), 4, (4, 3)))
  np.testing.assert_allclose(ours, _numpy_avg(x, 4, (4, 3)), rtol=1e-5, atol=1e-6)
  # The last row of windows holds a single input row (13 = 3 * 4 + 1).
  np.testing.assert_allclose(ours[:, 3, 0], x[:, 12, 0:4].mean(1), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------
# FRM neck.
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def frm_runs():
  """Per pooling: the FRM neck's variables and eval outputs on the odd-size maps
  and on the same maps with F1 scaled (one compilation per pooling)."""
  feats = _features()
  changed = (feats[0] * 3.0,) + feats[1:]
  runs = {}
  for pooling in ("polyphase", "avg"):
    neck = NECKS.build("frm", pooling=pooling)
    variables = jax.jit(neck.init)(jax.random.key(0), feats)
    apply = jax.jit(neck.apply)
    runs[pooling] = dict(variables=variables, out=apply(variables, feats),
                         out_changed=apply(variables, changed))
  return feats, runs


@pytest.mark.parametrize("pooling", ["polyphase", "avg"])
def test_frm_neck_shapes_on_odd_sizes(frm_runs, pooling):
  feats, runs = frm_runs
  out = runs[pooling]["out"]
  assert len(out) == 4
  for ours, ref in zip(out[:3], feats[:3]):         # unchanged levels
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(ref))
  assert out[3].shape == feats[3].shape              # refined top level, same width
  assert np.isfinite(np.asarray(out[3])).all()
  assert not np.allclose(np.asarray(out[3]), np.asarray(feats[3]))
  # The pooled lower levels feed the refined map.
  assert not np.allclose(np.asarray(runs[pooling]["out_changed"][3]), np.asarray(out[3]))


def test_frm_poolings_differ(frm_runs):
  _, runs = frm_runs
  assert not np.allclose(np.asarray(runs["polyphase"]["out"][3]),
                         np.asarray(runs["avg"]["out"][3]))


def test_frm_neck_fields_change_the_structure():
  feats = _features()
  neck = frm.FRM(pooling="avg", embed_dims=16, depth=2, norm="ln", ffn="mlp",
                 out_channels=20)
  variables = jax.jit(neck.init)(jax.random.key(0), feats)
  params = variables["params"]
  assert set(params) == {"reduce", "blocks.0", "blocks.1", "proj"}
  assert "dwconv.dwconv" not in params["blocks.0"]["mlp"]
  assert "norm1" in params["blocks.0"] and "norm1" not in variables.get("batch_stats", {}).get(
      "blocks.0", {})                                # LayerNorm, not BatchNorm
  assert params["blocks.0"]["attn"]["g"]["conv"]["kernel"].shape == (1, 1, 16, 8)
  assert jax.eval_shape(neck.apply, variables, feats)[3].shape == (2, 4, 3, 20)
  with pytest.raises(ValueError, match="shortcut"):   # F4 has 32 channels, not 20
    jax.eval_shape(neck.clone(shortcut=True).apply, variables, feats)
  with pytest.raises(ValueError, match="pooling"):
    frm.FRM(pooling="max").init(jax.random.key(0), feats)


def test_frm_train_mode_and_gradients_are_finite(frm_runs):
  feats, runs = frm_runs
  neck = frm.FRM()
  variables = runs["polyphase"]["variables"]

  def loss(params, inputs):
    out, state = neck.apply({**variables, "params": params}, inputs, train=True,
                            mutable=["batch_stats"])
    assert out[3].shape == feats[3].shape and "batch_stats" in state
    return jnp.sum(out[3] ** 2)

  g_params, g_inputs = jax.jit(jax.grad(loss, argnums=(0, 1)))(variables["params"], feats)
  for leaf in jax.tree.leaves(g_params) + jax.tree.leaves(g_inputs):
    assert np.isfinite(np.asarray(leaf)).all()
  assert np.abs(np.asarray(g_inputs[0])).sum() > 0    # F1 reaches the output


# ---------------------------------------------------------------------------
# Projection head and the pixel-contrastive loss.
# ---------------------------------------------------------------------------

def test_projection_head_unit_norm_and_finite_gradient_at_zero():
  head = BLOCKS.build("projection_head", embed_dim=6)
  x = jnp.asarray(np.random.default_rng(5).normal(size=(2, 4, 5, 8)), jnp.float32)
  variables = jax.jit(head.init)(jax.random.key(0), x)
  y = np.asarray(jax.jit(head.apply)(variables, x))
  assert y.shape == (2, 4, 5, 6)
  np.testing.assert_allclose(np.linalg.norm(y, axis=-1), 1.0, rtol=1e-5)
  lin = frm.ProjectionHead(embed_dim=3, kind="linear")
  v = jax.tree.map(jnp.zeros_like, jax.jit(lin.init)(jax.random.key(0), x))  # zero output
  g = jax.jit(jax.grad(lambda inp: jnp.sum(lin.apply(v, inp))))(x)
  assert np.isfinite(np.asarray(g)).all()


def _unit(*v):
  v = np.asarray(v, np.float64)
  return v / np.linalg.norm(v)


def _hand_contrast(f, lab, tau=0.1, tau_b=0.07):
  """The supervised pixel-contrast loss, written out per anchor."""
  s = f @ f.T / tau
  losses_ = []
  for i in range(len(f)):
    pos = [j for j in range(len(f)) if j != i and lab[j] == lab[i]]
    neg = [j for j in range(len(f)) if lab[j] != lab[i]]
    terms = [s[i, p] - np.log(np.exp(s[i, p]) + sum(np.exp(s[i, n]) for n in neg))
             for p in pos]
    losses_.append(-(tau / tau_b) * np.mean(terms))
  return float(np.mean(losses_))


# Embedding-grid labels of the hand case; 9 marks "ignore" (255).
_GRID = np.array([[0, 0, 0, 0],
                  [0, 0, 0, 0],
                  [1, 1, 1, 1],
                  [9, 9, 9, 2]])
_HARD = {(0, 0), (0, 1), (1, 3)}           # class-0 pixels predicted as class 1
_A, _B, _C, _E = (_unit(1, 0, 0), _unit(0.6, 0.8, 0), _unit(0, 0.3, 1), _unit(0, -1, 0.2))


def _hand_case():
  """Labels at 8x8 (nearest -> the 4x4 grid), logits and embedding at 4x4."""
  grid = np.where(_GRID == 9, 255, _GRID)
  labels = np.full((1, 8, 8), 2, np.int32)           # odd rows/cols: never read
  labels[0, ::2, ::2] = grid
  pred = np.where(grid == 255, 0, grid)
  emb = np.zeros((1, 4, 4, 3), np.float32)
  for (i, j), value in np.ndenumerate(_GRID):
    if value == 0:
      pred[i, j] = 1 if (i, j) in _HARD else 0
      emb[0, i, j] = _B if (i, j) in _HARD else _A
    else:
      emb[0, i, j] = _C if value == 1 else _E
  logits = 5.0 * np.eye(3, dtype=np.float32)[pred][None]
  return jnp.asarray(logits), jnp.asarray(emb), jnp.asarray(labels)


def test_pixel_contrastive_hand_case_hard_easy_ignore_and_warmup():
  logits, emb, labels = _hand_case()
  # max_views=2: class 0 (8 px) and class 1 (4 px) are present; class 2 (1 px) is
  # not, and the 3 ignored pixels are no class. n_view = min(4 // 2, 2) = 2:
  # class 0 gives 1 hard (b) + 1 easy (a); class 1 has no hard pixel, so 2 easy (c).
  expected = _hand_contrast(np.stack([_B, _A, _C, _C]), [0, 0, 1, 1])
  wrong_split = _hand_contrast(np.stack([_A, _A, _C, _C]), [0, 0, 1, 1])
  ignore_as_class = _hand_contrast(np.stack([_B, _A, _C, _C, _E, _E]), [0, 0, 1, 1, 9, 9])
  assert abs(expected - wrong_split) > 1e-3 and abs(expected - ignore_as_class) > 1e-3

  fn = jax.jit(lambda step: contrastive.pixel_contrastive(
      logits, {"embedding": emb}, labels, max_views=2, max_samples=4, warmup_steps=10,
      step=step))
  assert float(fn(0)) == 0.0 and float(fn(9)) == 0.0
  for step in (10, 11, 12, 500):                     # different draws, same groups
    np.testing.assert_allclose(float(fn(step)), expected, rtol=1e-5)

  # ignore_index=1: class 1 becomes ignored, only class 0 is left: no negatives, so
  # every log-probability is log(1) = 0.
  only0 = jax.jit(lambda: contrastive.pixel_contrastive(
      logits, {"embedding": emb}, labels, max_views=2, max_samples=4, warmup_steps=0,
      ignore_index=1, step=0))()
  assert abs(float(only0)) < 1e-6
  # Nothing labelled: 0, not NaN.
  empty = jax.jit(lambda: contrastive.pixel_contrastive(
      logits, {"embedding": emb}, jnp.full_like(labels, 255), warmup_steps=0, step=0))()
  assert float(empty) == 0.0


def test_pixel_contrastive_through_build_loss_with_weight():
  logits, emb, labels = _hand_case()
  loss_fn = losses.build_loss({"pixel_contrastive": {"weight": 0.1, "max_views": 2,
                                                     "max_samples": 4, "warmup_steps": 3}})
  loss_fn = jax.jit(loss_fn)
  total, terms = loss_fn(logits, {"embedding": emb}, labels, step=jnp.int32(3))
  expected = _hand_contrast(np.stack([_B, _A, _C, _C]), [0, 0, 1, 1])
  np.testing.assert_allclose(float(terms["pixel_contrastive"]), expected, rtol=1e-5)
  np.testing.assert_allclose(float(total), 0.1 * expected, rtol=1e-5)
  total0, _ = loss_fn(logits, {"embedding": emb}, labels, step=jnp.int32(2))
  assert float(total0) == 0.0


def test_sample_anchors_follow_the_rules_and_loss_matches_numpy():
  rng = np.random.default_rng(6)
  b, n, k, max_views, max_samples = 2, 36, 4, 3, 20
  labels = rng.choice([0, 1, 1, 2, 3, 3, 3, -1], size=(b, n)).astype(np.int32)
  labels[1, labels[1] == 0] = 2                       # class 0 absent from image 1
  pred = np.where(rng.random((b, n)) < 0.6, labels, rng.integers(0, k, (b, n)))
  sample = jax.jit(lambda key: contrastive.sample_anchors(
      jnp.asarray(labels), jnp.asarray(pred), k, key, max_samples=max_samples,
      max_views=max_views))
  image, pixel, cls, valid = map(np.asarray, sample(jax.random.key(7)))

  present = [(i, c) for i in range(b) for c in range(k) if (labels[i] == c).sum() > max_views]
  n_view = min(max_samples // len(present), max_views)
  assert valid.sum() == n_view * len(present)
  for i, c in present:
    sel = valid & (image == i) & (cls == c)
    px = pixel[sel]
    assert len(px) == n_view and len(set(px)) == n_view
    assert (labels[i, px] == c).all()
    hard_pool = int(((labels[i] == c) & (pred[i] != c)).sum())
    easy_pool = int(((labels[i] == c) & (pred[i] == c)).sum())
    if 2 * hard_pool >= n_view and 2 * easy_pool >= n_view:
      want_hard = n_view // 2
    elif 2 * hard_pool >= n_view:
      want_hard = n_view - easy_pool
    else:
      want_hard = hard_pool
    assert int((pred[i, px] != c).sum()) == want_hard

  emb = rng.normal(size=(b, n, 5))
  emb /= np.linalg.norm(emb, axis=-1, keepdims=True)
  feats = emb[image[valid], pixel[valid]]
  ours = contrastive.contrast(jnp.asarray(emb[image, pixel], jnp.float32), jnp.asarray(cls),
                              jnp.asarray(valid))
  np.testing.assert_allclose(float(ours), _hand_contrast(feats, cls[valid]), rtol=1e-4)

  other = np.asarray(sample(jax.random.key(8))[1])
  assert not np.array_equal(other[valid], pixel[valid])   # a new key draws new pixels


def test_pixel_contrastive_gradients_finite_through_projection_head():
  logits, _, labels = _hand_case()
  feats = jnp.asarray(np.random.default_rng(9).normal(size=(1, 4, 4, 8)), jnp.float32)
  head = frm.ProjectionHead(embed_dim=4)
  variables = jax.jit(head.init)(jax.random.key(0), feats)

  def loss(params, step):
    emb, _ = head.apply({**variables, "params": params}, feats, train=True,
                        mutable=["batch_stats"])
    return contrastive.pixel_contrastive(logits, {"embedding": emb}, labels, max_views=2,
                                         max_samples=4, warmup_steps=1, step=step)

  grad_fn = jax.jit(jax.grad(loss))
  grads = grad_fn(variables["params"], 1)
  leaves = [np.asarray(g) for g in jax.tree.leaves(grads)]
  assert all(np.isfinite(g).all() for g in leaves)
  assert sum(np.abs(g).sum() for g in leaves) > 0
  before = grad_fn(variables["params"], 0)
  assert all(not np.asarray(g).any() for g in jax.tree.leaves(before))
