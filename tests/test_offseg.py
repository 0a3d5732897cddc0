"""OffSeg (EfficientFormerV2 + OffSegHead): parity with the official code and its pieces.

The parity test loads the official OffSeg-T state dict of the ``offseg_t``
fixture (random weights, PyTorch outputs) by name and reproduces its backbone
maps, stride-4 logits, full-size logits and argmax. The unit tests pin down the
hand-written ops the port depends on (CARAFE, grid-sample, torch bicubic, the
4-group interleave) against direct re-statements of their definitions.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from offseg_jax.conversion import core
from offseg_jax.models import MODELS, efficientformer_v2, freqfusion, layers, offseg_head

SHARED = Path(os.environ.get("OFFSEG_SHARED",
                             Path(__file__).resolve().parents[1] / ".." / "shared"))
FIXTURE = SHARED / "parity" / "offseg_t"


def _param_count(tree) -> int:
  return int(sum(np.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(tree)))


# ----------------------------------------------------------------------------
# Parity with the official OffSeg-T.
# ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def parity():
  """Runs the converted OffSeg-T once on the fixture input (eval, float32)."""
  if not FIXTURE.with_suffix(".npz").exists():
    pytest.skip(f"parity fixture not found under {SHARED} (set OFFSEG_SHARED)")
  meta = json.loads(FIXTURE.with_suffix(".json").read_text())
  npz = np.load(FIXTURE.with_suffix(".npz"))
  header = meta["parity"]
  entry = MODELS.get(header["build"])
  model = entry.from_official(header["official_config"], header["num_classes"])
  state = {k[len("state/"):]: npz[k] for k in npz.files if k.startswith("state/")}
  images = jnp.asarray(npz["input"].transpose(0, 2, 3, 1))
  template = jax.eval_shape(model.init, jax.random.PRNGKey(0), images)
  variables, report = core.torch_to_flax(state, template, ignore=entry.torch_ignore)
  with jax.default_matmul_precision("highest"):
    logits, aux = jax.jit(model.apply)(variables, images)
  return dict(meta=meta, npz=npz, state=state, report=report, images=images,
              logits=np.asarray(logits), backbone=[np.asarray(f) for f in aux["backbone"]],
              full=np.asarray(layers.resize_bilinear(logits, images.shape[1:3])))


def _nhwc(a):
  return a.transpose(0, 2, 3, 1)


def test_parity_conversion_accounts_for_every_key(parity):
  # Strict conversion already raised on a missing/unexpected key; what was
  # ignored must be exactly the recomputed or constant buffers.
  ignored = parity["report"]["ignored"]
  assert ignored, "nothing ignored: the ignore list did not apply"
  allowed = ("num_batches_tracked", "attention_biases", "attention_bias_idxs",
             "attention_bias_idxs_seg", "init_pos", "hamming_lowpass", "hamming_highpass")
  assert all(k.rsplit(".", 1)[-1] in allowed for k in ignored), ignored
  assert len(parity["state"]) == parity["meta"]["weights"]["state_entries"]


def test_parity_backbone(parity):
  noise = parity["meta"]["float32_vs_float64"]["backbone"]
  for i, ours in enumerate(parity["backbone"]):
    ref = _nhwc(parity["npz"][f"backbone/{i}"])
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, rtol=0, atol=max(10 * noise[i], 1e-4),
                               err_msg=f"backbone/{i}")


def test_parity_logits(parity):
  ref = _nhwc(parity["npz"]["logits"])
  assert parity["logits"].shape == ref.shape
  atol = parity["meta"]["parity"]["compare"]["logits"]
  np.testing.assert_allclose(parity["logits"], ref, rtol=0, atol=atol)


def test_parity_full_resolution_logits_and_prediction(parity):
  npz = parity["npz"]
  classes = npz["logits_full_classes"]
  atol = max(10 * parity["meta"]["float32_vs_float64"]["logits_full"], 1e-4)
  np.testing.assert_allclose(parity["full"][..., classes], _nhwc(npz["logits_full"]),
                             rtol=0, atol=atol)
  pred = parity["full"].argmax(-1).astype(np.uint8)
  assert pred.shape == npz["pred"].shape
  assert np.mean(pred != npz["pred"]) <= 1e-3


def test_recomputed_buffers_equal_the_official_ones(parity):
  state = parity["state"]
  for key, value in state.items():
    if key.endswith("attention_bias_idxs_seg"):
      downsample = key.startswith("backbone.network.5.attn")
      idx, n = efficientformer_v2.attention_bias_index(16, 32 if downsample else 16,
                                                       2 if downsample else 1)
      np.testing.assert_array_equal(idx, value, err_msg=key)
      table = state[key.replace("attention_bias_idxs_seg", "attention_biases_seg")]
      assert table.shape[1] == n
    elif key.endswith("dysampler.init_pos"):
      np.testing.assert_array_equal(freqfusion.sampler_init_pos(4, 2), value.reshape(-1))
    elif key.endswith(("hamming_lowpass", "hamming_highpass")):
      np.testing.assert_array_equal(value, [1.0])   # the window our normaliser omits


# ----------------------------------------------------------------------------
# Structure: parameter counts, variants, other input sizes.
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("name,expected,paper_m", [
    ("offseg_t", 6_222_176, 6.222),
    ("offseg_b", 12_955_400, 12.955),
    ("offseg_l", 26_414_008, 26.414),
])
def test_parameter_counts_match_the_official_models(name, expected, paper_m):
  model = MODELS.build(name, num_classes=150)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))
  count = _param_count(shapes["params"])
  assert count == expected
  assert round(count / 1e6, 3) == paper_m
  if name == "offseg_t":   # the fixture's backbone / head split
    assert _param_count(shapes["params"]["backbone"]) == 5_748_360
    assert _param_count(shapes["params"]["decode_head"]) == 473_816


def test_classifier_is_switchable_by_field():
  images = jnp.zeros((1, 64, 64, 3))
  ol = jax.eval_shape(MODELS.build("offseg_t", num_classes=19).init,
                      jax.random.PRNGKey(0), images)
  conv = MODELS.build("offseg_t", num_classes=19, classifier="conv")
  shapes = jax.eval_shape(conv.init, jax.random.PRNGKey(0), images)
  logits, _ = jax.eval_shape(conv.apply, shapes, images)
  assert "offset_learning" in ol["params"]["decode_head"]
  assert "offset_learning" not in shapes["params"]["decode_head"]
  assert logits.shape == (1, 16, 16, 19)


def test_reduced_variant_from_overrides():
  model = MODELS.build(
      "offseg_t", num_classes=5,
      backbone=dict(widths=(16, 24, 32, 48), depths=(1, 1, 2, 2),
                    expansion_ratios=((2,), (2,), (2, 2), (2, 2)), vit_num=1, num_heads=2),
      head=dict(new_channels=(32, 32, 32, 32), channels=64))
  images = jnp.zeros((1, 64, 96, 3))
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), images)
  logits, aux = jax.eval_shape(model.apply, shapes, images)
  assert logits.shape == (1, 16, 24, 5)
  assert [f.shape[-1] for f in aux["backbone"]] == [16, 24, 32, 48]
  network = shapes["params"]["backbone"]
  assert "token_mixer" in network["network.4.1"] and "token_mixer" not in network["network.4.0"]
  assert _param_count(shapes["params"]) < 400_000


def test_input_sizes_must_be_multiples_of_32():
  model = MODELS.build("offseg_t", num_classes=19)
  with pytest.raises(ValueError, match="multiples of 32"):
    jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 48, 64, 3)))


def _random_variables(template, seed: int = 0):
  """Fills an eval_shape template with fan-in scaled random weights (numpy, no compile).

  Jitting ``model.init`` would compile every initialiser's RNG (minutes on 2 cores);
  any well-scaled weights serve a shape and training-mode test.
  """
  rng = np.random.default_rng(seed)
  flat = flax.traverse_util.flatten_dict(template)
  out = {}
  for path, leaf in flat.items():
    name = path[-1]
    if name == "kernel":
      value = rng.standard_normal(leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))
    elif name in ("scale", "var"):
      value = np.ones(leaf.shape)
    elif name.startswith("layer_scale"):
      value = np.full(leaf.shape, 0.5)
    else:   # biases, running means, bias tables, class embeddings
      value = 0.1 * rng.standard_normal(leaf.shape)
    out[path] = jnp.asarray(value, leaf.dtype)
  return flax.traverse_util.unflatten_dict(out)


def test_jitted_train_forward_on_another_size():
  model = MODELS.build("offseg_t", num_classes=19, drop_path_rate=0.1)
  images = jax.random.normal(jax.random.PRNGKey(1), (2, 64, 96, 3))
  variables = _random_variables(jax.eval_shape(model.init, jax.random.PRNGKey(0), images))

  @jax.jit
  def train_forward(variables, images, rng):
    return model.apply(variables, images, train=True, mutable=["batch_stats"],
                       rngs={"dropout": rng})

  (logits, aux), updates = train_forward(variables, images, jax.random.PRNGKey(2))
  assert logits.shape == (2, 16, 24, 19)
  assert [f.shape[1:3] for f in aux["backbone"]] == [(16, 24), (8, 12), (4, 6), (2, 3)]
  assert np.isfinite(np.asarray(logits)).all()
  # The two images are different, so are their logits (no cross-sample mixing bug).
  assert not np.allclose(logits[0], logits[1])
  # Running statistics moved towards the batch statistics (torch momentum 0.1).
  old = flax.traverse_util.flatten_dict(variables["batch_stats"])
  new = flax.traverse_util.flatten_dict(updates["batch_stats"])
  assert old.keys() == new.keys()
  assert all(not np.allclose(old[k], new[k]) for k in old if k[-1] == "var")
  stem = ("backbone", "patch_embed.1", "mean")
  assert not np.allclose(old[stem], new[stem])


# ----------------------------------------------------------------------------
# CARAFE (mmcv CUDA-op semantics).
# ----------------------------------------------------------------------------

def _carafe_naive(x, masks, k, s, groups):
  """Direct loop over output pixels and taps of the CARAFE definition (numpy)."""
  b, h, w, c = x.shape
  r = (k - 1) // 2
  cg = c // groups
  out = np.zeros((b, s * h, s * w, c))
  for yy in range(s * h):
    for xx in range(s * w):
      for g in range(groups):
        for p in range(k):
          for q in range(k):
            y, x_ = yy // s + p - r, xx // s + q - r
            if 0 <= y < h and 0 <= x_ < w:
              weight = masks[:, yy, xx, (g * k + p) * k + q, None]
              out[:, yy, xx, g * cg:(g + 1) * cg] += weight * x[:, y, x_, g * cg:(g + 1) * cg]
  return out


@pytest.mark.parametrize("k,s,groups", [(3, 1, 1), (5, 2, 1), (5, 1, 2), (3, 2, 2)])
def test_carafe_matches_the_definition(k, s, groups):
  rng = np.random.default_rng(k * 10 + s + groups)
  x = rng.standard_normal((2, 5, 7, 4)).astype(np.float32)
  masks = rng.standard_normal((2, 5 * s, 7 * s, groups * k * k)).astype(np.float32)
  ours = jax.jit(freqfusion.carafe, static_argnums=(2, 3, 4))(x, masks, k, s, groups)
  np.testing.assert_allclose(ours, _carafe_naive(x, masks, k, s, groups), rtol=0, atol=1e-5)


def test_carafe_zero_pads_without_renormalising():
  x = jnp.ones((1, 4, 6, 1))
  masks = jnp.full((1, 8, 12, 9), 1 / 9)          # a normalised box filter
  out = np.asarray(freqfusion.carafe(x, masks, 3, 2))[0, ..., 0]
  assert out[3, 5] == pytest.approx(1.0)          # interior: all taps inside
  assert out[0, 0] == pytest.approx(4 / 9)        # corner parent: 4 taps inside
  assert out[0, 5] == pytest.approx(6 / 9)        # edge parent: 6 taps inside
  assert out[7, 11] == pytest.approx(4 / 9)


def test_carafe_gradients_match_autodiff_of_the_dense_form():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((1, 4, 5, 3)), jnp.float32)
  masks = jnp.asarray(rng.standard_normal((1, 8, 10, 25)), jnp.float32)
  cot = jnp.asarray(rng.standard_normal((1, 8, 10, 3)), jnp.float32)

  def dense(x, masks):   # im2col-style restatement, fine at this size
    xp = jnp.pad(x, ((0, 0), (2, 2), (2, 2), (0, 0)))
    taps = jnp.stack([xp[:, p:p + 4, q:q + 5] for p in range(5) for q in range(5)], -1)
    taps = jnp.repeat(jnp.repeat(taps, 2, axis=1), 2, axis=2)
    return jnp.einsum("bhwct,bhwt->bhwc", taps, masks)

  ours = jax.grad(lambda a, m: jnp.sum(freqfusion.carafe(a, m, 5, 2) * cot), (0, 1))(x, masks)
  ref = jax.grad(lambda a, m: jnp.sum(dense(a, m) * cot), (0, 1))(x, masks)
  for a, b in zip(ours, ref):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-4)


# ----------------------------------------------------------------------------
# grid-sample and the resampler.
# ----------------------------------------------------------------------------

def _grid_sample_naive(x, grid):
  """torch grid_sample(bilinear, border, align_corners=False), one point at a time."""
  n, h, w, c = x.shape
  out = np.zeros(grid.shape[:3] + (c,))
  for b in range(n):
    for i in range(grid.shape[1]):
      for j in range(grid.shape[2]):
        px = min(max(((grid[b, i, j, 0] + 1) * w - 1) / 2, 0), w - 1)
        py = min(max(((grid[b, i, j, 1] + 1) * h - 1) / 2, 0), h - 1)
        x0, y0 = int(np.floor(px)), int(np.floor(py))
        for yy, wy in ((y0, 1 - (py - y0)), (y0 + 1, py - y0)):
          for xx, wx in ((x0, 1 - (px - x0)), (x0 + 1, px - x0)):
            if 0 <= yy < h and 0 <= xx < w:
              out[b, i, j] += wy * wx * x[b, yy, xx]
  return out


def test_grid_sample_matches_torch_border_semantics():
  rng = np.random.default_rng(3)
  x = rng.standard_normal((2, 5, 7, 3)).astype(np.float32)
  grid = rng.uniform(-1.4, 1.4, (2, 4, 6, 2)).astype(np.float32)   # some points outside
  grid[0, 0, 0] = (-1, -1)                                        # exact corners
  grid[0, 0, 1] = (1, 1)
  grid[1, 3, 5] = (3.0, -2.5)                                     # far outside: clamps
  ours = np.asarray(jax.jit(freqfusion.grid_sample)(x, grid))
  np.testing.assert_allclose(ours, _grid_sample_naive(x, grid), rtol=0, atol=1e-5)
  np.testing.assert_allclose(ours[1, 3, 5], x[1, 0, 6], atol=1e-6)   # clamped to the border pixel


def test_resampler_is_identity_at_zero_learned_offset():
  sampler = freqfusion.LocalSimGuidedSampler(groups=4)
  feat = jax.random.normal(jax.random.PRNGKey(0), (2, 6, 10, 8))
  offset = jnp.broadcast_to(jnp.asarray(freqfusion.sampler_init_pos(4, 2)), (2, 3, 5, 32))
  out = sampler.apply({}, feat, offset, method=sampler._sample)
  np.testing.assert_allclose(out, feat, rtol=0, atol=1e-5)


def test_resampler_offsets_move_groups_and_subpixels_independently():
  # A one-low-res-pixel x shift for group 1, sub-pixel (0, 1) only: that output
  # pixel then reads two high-res pixels to the right, every other one stays.
  sampler = freqfusion.LocalSimGuidedSampler(groups=4)
  feat = jax.random.normal(jax.random.PRNGKey(1), (1, 6, 10, 8))
  offset = np.broadcast_to(freqfusion.sampler_init_pos(4, 2), (1, 3, 5, 32)).copy()
  offset[0, 1, 2, 0 * 16 + 1 * 4 + 0 * 2 + 1] += 1.0
  out = np.asarray(sampler.apply({}, feat, jnp.asarray(offset), method=sampler._sample))
  feat = np.asarray(feat)
  np.testing.assert_allclose(out[0, 2, 5, 2:4], feat[0, 2, 7, 2:4], atol=1e-5)
  mask = np.ones(out.shape, bool)
  mask[0, 2, 5, 2:4] = False
  np.testing.assert_allclose(out[mask], feat[mask], atol=1e-5)


def test_local_cosine_similarity_taps():
  x = np.random.default_rng(4).standard_normal((1, 6, 5, 3)).astype(np.float32)
  sims = np.asarray(freqfusion.local_cosine_similarity(jnp.asarray(x), dilation=2))
  offsets = [(-2, -2), (-2, 0), (-2, 2), (0, -2), (0, 2), (2, -2), (2, 0), (2, 2)]
  for t, (dy, dx) in enumerate(offsets):
    for y in range(6):
      for xx in range(5):
        yy, xn = y + dy, xx + dx
        want = 0.0
        if 0 <= yy < 6 and 0 <= xn < 5:
          a, b = x[0, y, xx], x[0, yy, xn]
          want = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
        assert sims[0, y, xx, t] == pytest.approx(want, abs=1e-5)


# ----------------------------------------------------------------------------
# torch bicubic for the attention-bias resize; the head's channel interleave.
# ----------------------------------------------------------------------------

def _torch_bicubic_naive(img, out_h, out_w):
  """PyTorch's bicubic (A=-0.75, align_corners=False) written per output pixel."""
  a = -0.75

  def cubic(d):
    d = abs(d)
    if d <= 1:
      return ((a + 2) * d - (a + 3)) * d * d + 1
    if d < 2:
      return ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
    return 0.0

  in_h, in_w = img.shape[-2:]
  out = np.zeros(img.shape[:-2] + (out_h, out_w))
  for i in range(out_h):
    sy = (i + 0.5) * in_h / out_h - 0.5
    y0 = min(int(np.floor(sy)), in_h - 1)
    ty = min(max(sy - y0, 0.0), 1.0)
    for j in range(out_w):
      sx = (j + 0.5) * in_w / out_w - 0.5
      x0 = min(int(np.floor(sx)), in_w - 1)
      tx = min(max(sx - x0, 0.0), 1.0)
      for m in range(-1, 3):
        for n in range(-1, 3):
          yy = min(max(y0 + m, 0), in_h - 1)
          xx = min(max(x0 + n, 0), in_w - 1)
          out[..., i, j] += cubic(m - ty) * cubic(n - tx) * img[..., yy, xx]
  return out


@pytest.mark.parametrize("size_in,size_out", [((6, 5), (13, 11)), ((16, 20), (4, 5)),
                                              ((7, 9), (5, 12)), ((4, 4), (4, 4))])
def test_bicubic_matches_torch_formula(size_in, size_out):
  img = np.random.default_rng(5).standard_normal((2,) + size_in).astype(np.float32)
  ours = np.asarray(efficientformer_v2.resize_bicubic(jnp.asarray(img), size_out))
  np.testing.assert_allclose(ours, _torch_bicubic_naive(img, *size_out), rtol=0, atol=1e-5)


def test_bicubic_matches_torch_when_available():
  torch = pytest.importorskip("torch", reason="optional cross-check against torch itself")
  img = np.random.default_rng(6).standard_normal((1, 8, 64, 64)).astype(np.float32)
  for size in [(256, 256), (16, 48), (100, 37)]:
    ref = torch.nn.functional.interpolate(torch.from_numpy(img), size=size, mode="bicubic",
                                          align_corners=False).numpy()
    ours = np.asarray(efficientformer_v2.resize_bicubic(jnp.asarray(img), size))
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5)


def test_interleave_matches_the_official_batch_fold():
  b, h, w, c_hr, c_lr = 2, 3, 4, 8, 12
  hr = np.arange(b * c_hr * h * w, dtype=np.float32).reshape(b, c_hr, h, w)
  lr = -np.arange(b * c_lr * h * w, dtype=np.float32).reshape(b, c_lr, h, w) - 1
  # The official NCHW code: fold channels into 4 batch slots, concat, unfold.
  ref = np.concatenate([hr.reshape(b * 4, -1, h, w), lr.reshape(b * 4, -1, h, w)],
                       axis=1).reshape(b, -1, h, w)
  ours = offseg_head.interleave_quarters(jnp.asarray(_nhwc(hr)), jnp.asarray(_nhwc(lr)))
  np.testing.assert_array_equal(np.asarray(ours), _nhwc(ref))
  # Quarter q holds hr channels 2q..2q+1 then lr channels 3q..3q+2.
  np.testing.assert_array_equal(np.asarray(ours)[0, 0, 0, 5:10],
                                _nhwc(np.concatenate([hr[:, 2:4], lr[:, 3:6]], 1))[0, 0, 0])
