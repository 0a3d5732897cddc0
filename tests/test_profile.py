"""The step profiler (offseg_jax.tools.profile) and the CPU-tuned layer forms it led to.

* the profiler runs the trainer's step on the tiny model and prints forward and
  backward tables with rows (a smoke test of the trace parsing);
* every hand-written gradient (bilinear upsampling, non-overlapping max pool,
  CARAFE, unit-stride depthwise convolutions, GELU) equals jax's autodiff of
  the reference formulation (and finite differences);
* 1x1 convolutions as matmuls equal ``conv_general_dilated``, values and
  gradients, and a whole SegFormer-OL train-step gradient is the same under
  the reference forms (``layers.reference_forms``) and the current ones.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.test_util import check_grads
import numpy as np
import pytest

from experiments.configs import default
from offseg_jax.models import build_model, layers
from offseg_jax.tools import profile


# ---------------------------------------------------------------------------
# The profiler.
# ---------------------------------------------------------------------------

def test_profile_tool_prints_forward_and_backward_tables_on_the_tiny_model():
  config = default.get_config("tiny")
  result = profile.profile(config, batch=2, size=(64, 64), steps=1, warmup=0,
                           say=lambda *a, **k: None)
  records = result["train_records"]
  phases = {r["phase"] for r in records}
  assert {"forward", "backward", "optimizer"} <= phases
  # Convolutions of the backbone are found, attributed to their flax modules.
  assert any(r["kind"] == "convolution" and r["module"].startswith("backbone/")
             for r in records if r["phase"] == "forward")
  assert any(r["module"] == "loss" for r in records if r["phase"] == "forward")
  assert all(r["ms"] >= 0 for r in records)
  assert result["forward_records"] and result["train_ms"]

  text = profile.format_report(result, top=5)
  print(text)
  for phase in ("forward", "backward", "optimizer", "inference"):
    lines = text.split(f"\n{phase}: ", 1)[1].split("\n\n", 1)[0].splitlines()
    rows = [l for l in lines[2:] if not l.lstrip().startswith("(")]
    assert len(rows) == 5, (phase, lines)          # --top rows, each with a time
    assert all(l.split()[-4].replace(".", "", 1).isdigit() for l in rows), rows


def test_profile_parses_hlo_names_phases_and_modules():
  hlo = """HloModule jit_train_step, entry_computation_layout={()->f32[]}

%fused_computation (p: f32[4]) -> f32[4] {
  %p = f32[4]{0} parameter(0)
  ROOT %convolution.1 = f32[4]{0} convolution(%p, %p), dim_labels=b0f_0io->b0f, metadata={op_name="jit(train_step)/transpose(jvp(EncoderDecoder))/backbone/stage.0/conv/conv_general_dilated"}
}

ENTRY %main (a: f32[4]) -> (f32[4], f32[2]) {
  %a = f32[4]{0} parameter(0), metadata={op_name="state"}
  %ynn_fusion = f32[4]{0} fusion(%a), kind=kCustom, calls=%fused_computation
  %copy.1 = f32[4]{0} copy(%ynn_fusion)
  %add = f32[4]{0} add(%a, %a), metadata={op_name="jit(train_step)/jvp(jit(log_softmax))/add"}
  ROOT %t = (f32[4]{0}, f32[2]{0}) tuple(%copy.1, %add)
}
"""
  instructions, computations = profile.parse_hlo(hlo)
  assert instructions["ynn_fusion"].calls == ("fused_computation",)
  assert instructions["copy.1"].operands == ("ynn_fusion",)
  assert instructions["t"].shape.startswith("(")
  events = [("jit_train_step", "ynn_fusion", 2.0), ("jit_train_step", "copy.1", 1.0),
            ("jit_train_step", "add", 0.5), ("jit_other", "add", 9.0)]
  records = {r["hlo_op"]: r for r in profile.attribute(events, hlo, steps=1)}
  assert records["ynn_fusion"]["kind"] == "convolution"
  assert records["ynn_fusion"]["phase"] == "backward"
  assert records["ynn_fusion"]["module"] == "backbone/stage.0/conv"
  assert records["add"] == dict(records["add"], phase="forward", module="loss",
                                primitive="log_softmax:add", ms=0.5)
  # An op without a name inherits its nearest named input's, marked with a star.
  assert records["copy.1"]["module"] == "backbone/stage.0/conv*"
  assert records["copy.1"]["phase"] == "backward"
  rows = profile.group_records(list(records.values()), "module")
  assert rows[0]["module"] == "backbone/stage.0/conv" and rows[0]["ms"] == 2.0


@pytest.mark.parametrize("op_name,module,phase", [
    ("jit(train_step)/jvp(EncoderDecoder)/decode_head/Dropout_0/jit(_bernoulli)/add",
     "decode_head/Dropout_0", "forward"),
    ("jit(train_step)/transpose(jvp(EncoderDecoder))/decode_head/jit(_take)/gather",
     "decode_head", "backward"),
    ("jit(train_step)/transpose(jvp(jit(take_along_axis)))/scatter-add", "loss", "backward"),
    ("jit(train_step)/add", "step", "optimizer"),
    ("jit(forward)/EncoderDecoder/backbone/stem/bn/mul", "backbone/stem/bn", "optimizer"),
])
def test_module_and_phase_of_name_stacks(op_name, module, phase):
  assert profile.module_of(op_name) == module
  assert profile.phase_of(op_name) == phase


# ---------------------------------------------------------------------------
# Bilinear upsampling: hand-written gradient.
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("src,dst", [
    ((8, 8), (64, 64)), ((4, 6), (16, 12)), ((1, 3), (4, 9)), ((2, 2), (6, 10)),
    ((3, 5), (9, 5)), ((16, 4), (16, 28)),
    # down by integer factors and other ratios (slices / gathers, jax's own gradient)
    ((16, 12), (4, 3)), ((5, 7), (10, 3)), ((33, 17), (11, 40))])
def test_resize_gradient_equals_autodiff_of_the_gather_form(src, dst):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, *src, 3)).astype(np.float32))
  cot = jnp.asarray(rng.normal(size=(2, *dst, 3)).astype(np.float32))
  want_y = layers.resize_bilinear_gather(x, dst)
  got_y = layers.resize_bilinear(x, dst)
  np.testing.assert_allclose(np.asarray(got_y), np.asarray(want_y), rtol=1e-6, atol=1e-6)
  want = jax.grad(lambda x: jnp.sum(layers.resize_bilinear_gather(x, dst) * cot))(x)
  got = jax.jit(jax.grad(lambda x: jnp.sum(layers.resize_bilinear(x, dst) * cot)))(x)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
  with layers.reference_forms():
    ref = jax.grad(lambda x: jnp.sum(layers.resize_bilinear(x, dst) * cot))(x)
  np.testing.assert_array_equal(np.asarray(ref), np.asarray(want))


def test_resize_upsampling_has_no_gather_or_scatter_and_checks_against_finite_differences():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(1, 3, 4, 2)))
  with jax.enable_x64():
    x64 = jnp.asarray(rng.normal(size=(1, 3, 4, 2)))
    check_grads(lambda x: layers.resize_bilinear(x, (12, 8)) ** 2, (x64,), order=1,
                modes=["rev"], atol=1e-6, rtol=1e-6)
  hlo = jax.jit(jax.grad(lambda x: jnp.sum(layers.resize_bilinear(x, (24, 32)) ** 2))).lower(
      x.astype(jnp.float32)).as_text()
  assert "gather" not in hlo and "scatter" not in hlo
  with layers.reference_forms():
    hlo = jax.jit(jax.grad(lambda x: jnp.sum(layers.resize_bilinear(x, (24, 32)) ** 2))).lower(
        x.astype(jnp.float32)).as_text()
  assert "scatter" in hlo


def test_resize_bfloat16_matches_the_gather_form():
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(1, 4, 4, 8)), jnp.bfloat16)
  cot = jnp.asarray(rng.normal(size=(1, 16, 32, 8)), jnp.bfloat16)
  got = jax.grad(lambda x: jnp.sum((layers.resize_bilinear(x, (16, 32)) * cot)
                                   .astype(jnp.float32)))(x)
  want = jax.grad(lambda x: jnp.sum((layers.resize_bilinear_gather(x, (16, 32)) * cot)
                                    .astype(jnp.float32)))(x)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                             rtol=0.05, atol=0.1)


# ---------------------------------------------------------------------------
# Max pool: hand-written gradient.
# ---------------------------------------------------------------------------

def _torch_max_pool_grad(x, k, g):
  """numpy: each window's gradient goes to its first maximum in row-major order."""
  b, h, w, c = x.shape
  dx = np.zeros_like(x)
  for n in range(b):
    for i in range(h // k):
      for j in range(w // k):
        for ch in range(c):
          win = x[n, i * k:(i + 1) * k, j * k:(j + 1) * k, ch]
          r, s = np.unravel_index(np.argmax(win), win.shape)     # first max
          dx[n, i * k + r, j * k + s, ch] += g[n, i, j, ch]
  return dx


@pytest.mark.parametrize("shape,k", [((2, 8, 8, 3), 2), ((1, 9, 11, 2), 2), ((1, 9, 7, 2), 3)])
def test_max_pool_gradient_equals_autodiff_of_reduce_window(shape, k):
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=shape).astype(np.float32))     # no ties
  ref = lambda x: nn.max_pool(x, (k, k), strides=(k, k), padding="VALID")
  y = layers.max_pool(x, (k, k), (k, k))
  np.testing.assert_array_equal(np.asarray(y), np.asarray(ref(x)))
  cot = jnp.asarray(rng.normal(size=y.shape).astype(np.float32))
  got = jax.jit(jax.grad(lambda x: jnp.sum(layers.max_pool(x, (k, k), (k, k)) * cot)))(x)
  want = jax.grad(lambda x: jnp.sum(ref(x) * cot))(x)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  with jax.enable_x64():
    x64 = jnp.asarray(rng.normal(size=shape))
    check_grads(lambda x: layers.max_pool(x, (k, k), (k, k)) ** 2, (x64,), order=1,
                modes=["rev"], eps=1e-4)


def test_max_pool_ties_go_to_the_first_maximum_as_in_torch():
  rng = np.random.default_rng(4)
  # Post-ReLU maps: many windows are all zero or hold equal maxima.
  x = np.maximum(rng.integers(-2, 3, size=(2, 6, 8, 4)), 0).astype(np.float32)
  g = rng.normal(size=(2, 3, 4, 4)).astype(np.float32)
  got = jax.grad(lambda x: jnp.sum(layers.max_pool(x, (2, 2)) * g))(jnp.asarray(x))
  np.testing.assert_array_equal(np.asarray(got), _torch_max_pool_grad(x, 2, g))


def test_overlapping_max_pool_falls_back_to_flax():
  x = jnp.asarray(np.random.default_rng(5).normal(size=(1, 7, 7, 2)).astype(np.float32))
  np.testing.assert_array_equal(
      np.asarray(layers.max_pool(x, (3, 3), (2, 2))),
      np.asarray(nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")))


# ---------------------------------------------------------------------------
# 1x1 convolutions as matmuls.
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("stride,padding", [(1, 0), (2, 0), (1, 1), (2, ((0, 1), (1, 0)))])
def test_pointwise_conv_as_matmul_equals_the_convolution(stride, padding):
  rng = np.random.default_rng(6)
  x = jnp.asarray(rng.normal(size=(2, 9, 10, 12)).astype(np.float32))
  conv = layers.Conv2d(7, 1, stride, padding)
  v = conv.init(jax.random.PRNGKey(0), x)
  outs = {}
  for impl in ("conv", "shift"):      # 'shift': the CPU forms (1x1 as matmuls)
    with layers.depthwise_impl(impl):
      outs[impl] = conv.apply(v, x)
      outs[impl + "_grad"] = jax.grad(
          lambda v, x: jnp.sum(conv.apply(v, x) ** 2), argnums=(0, 1))(v, x)
      jaxpr = str(jax.make_jaxpr(lambda x: conv.apply(v, x))(x))
    assert ("conv_general_dilated" in jaxpr) == (impl == "conv")
  np.testing.assert_allclose(np.asarray(outs["shift"]), np.asarray(outs["conv"]),
                             rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.tree_util.tree_leaves(outs["shift_grad"]),
                  jax.tree_util.tree_leaves(outs["conv_grad"])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)


def test_reference_forms_keep_pointwise_convolutions():
  x = jnp.ones((1, 4, 4, 3))
  conv = layers.Conv2d(5, 1)
  v = conv.init(jax.random.PRNGKey(0), x)
  with layers.depthwise_impl("shift"), layers.reference_forms():
    assert "conv_general_dilated" in str(jax.make_jaxpr(lambda x: conv.apply(v, x))(x))


# ---------------------------------------------------------------------------
# A whole model: the same gradients under both forms.
# ---------------------------------------------------------------------------

def test_segformer_ol_train_gradients_match_the_reference_forms():
  model = build_model({"name": "segformer_b0_ol", "embed_dims": 8, "num_layers": (1, 1, 1, 1),
                       "channels": 32, "drop_path_rate": 0.0}, 5)
  rng = np.random.default_rng(7)
  images = jnp.asarray(rng.normal(size=(2, 32, 32, 3)).astype(np.float32))
  labels = jnp.asarray(rng.integers(0, 5, size=(2, 32, 32)).astype(np.int32))
  variables = model.init(jax.random.PRNGKey(0), images)

  def loss(params):
    (logits, _), _ = model.apply({"params": params, "batch_stats": variables["batch_stats"]},
                                 images, train=True, mutable=["batch_stats"],
                                 rngs={"dropout": jax.random.PRNGKey(1)})
    logits = layers.resize_bilinear(logits, labels.shape[1:])
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, labels[..., None], axis=-1))

  grads = {}
  for name, reference in (("reference", True), ("current", False)):
    with layers.depthwise_impl("shift"), layers.reference_forms(reference):
      grads[name] = jax.jit(jax.value_and_grad(loss))(variables["params"])
  np.testing.assert_allclose(grads["current"][0], grads["reference"][0], rtol=1e-5)
  flat_ref = jax.tree_util.tree_leaves_with_path(grads["reference"][1])
  flat_cur = jax.tree_util.tree_leaves(grads["current"][1])
  overall = max(float(jnp.abs(g).max()) for _, g in flat_ref)
  for (path, ref), cur in zip(flat_ref, flat_cur):
    # float32 rounding differs (sums in another order); a wrong gradient would
    # be off by the order of the gradient itself.
    scale = float(jnp.abs(ref).max())
    err = float(jnp.abs(cur - ref).max())
    assert err <= 1e-3 * scale + 1e-5 * overall, (jax.tree_util.keystr(path), err, scale)


# ---------------------------------------------------------------------------
# FreqFusion's CARAFE: the hand-written (matmul) gradient against the loop's own.
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("k,s,groups", [(5, 2, 1), (3, 1, 1), (3, 2, 2)])
def test_carafe_matmul_gradient_equals_autodiff_of_the_loop_form(k, s, groups):
  from offseg_jax.models import freqfusion
  rng = np.random.default_rng(k + s + groups)
  x = jnp.asarray(rng.normal(size=(2, 5, 6, 8)).astype(np.float32))
  masks = jnp.asarray(rng.normal(size=(2, 5 * s, 6 * s, groups * k * k)).astype(np.float32))
  cot = jnp.asarray(rng.normal(size=(2, 5 * s, 6 * s, 8)).astype(np.float32))
  out, grads = {}, {}
  for name, reference in (("loop", True), ("matmul", False)):
    with layers.depthwise_impl("shift"), layers.reference_forms(reference):
      fn = lambda x, m: jnp.sum(freqfusion.carafe(x, m, k, s, groups) * cot)
      out[name] = freqfusion.carafe(x, masks, k, s, groups)
      grads[name] = jax.jit(jax.grad(fn, argnums=(0, 1)))(x, masks)
      jaxpr = str(jax.make_jaxpr(fn)(x, masks))
    assert ("custom_vjp_call" in jaxpr) == (not reference)
  np.testing.assert_allclose(np.asarray(out["matmul"]), np.asarray(out["loop"]),
                             rtol=1e-5, atol=1e-5)
  for a, b in zip(grads["matmul"], grads["loop"]):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_carafe_gradient_checks_against_finite_differences():
  from offseg_jax.models import freqfusion
  rng = np.random.default_rng(8)
  with jax.enable_x64(), layers.depthwise_impl("shift"):
    x = jnp.asarray(rng.normal(size=(1, 3, 4, 4)))
    masks = jnp.asarray(rng.normal(size=(1, 6, 8, 2 * 9)))
    check_grads(lambda x, m: freqfusion.carafe(x, m, 3, 2, 2) ** 2, (x, masks), order=1,
                modes=["rev"], atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------
# Depthwise convolutions: the hand-written gradient of the unit-stride form.
# ---------------------------------------------------------------------------

def _grouped_conv(x, kernel, padding):
  return jax.lax.conv_general_dilated(x, kernel, (1, 1), padding,
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                      feature_group_count=x.shape[-1])


@pytest.mark.parametrize("kernel,padding", [
    ((3, 3), ((1, 1), (1, 1))), ((5, 5), ((2, 2), (2, 2))), ((1, 7), ((0, 0), (3, 3))),
    ((21, 1), ((10, 10), (0, 0))), ((3, 3), ((0, 0), (0, 0))), ((3, 2), ((1, 0), (0, 1)))])
@pytest.mark.parametrize("chunk_bytes", [1 << 19, 400])
def test_depthwise_gradient_equals_autodiff_of_the_grouped_convolution(
    kernel, padding, chunk_bytes, monkeypatch):
  # 400 bytes: the kernel-gradient loop takes 2 rows of (2, 11, 4) per step,
  # so 13 rows end in a chunk padded with a zero row.
  monkeypatch.setattr(layers, "_KERNEL_GRAD_CHUNK_BYTES", chunk_bytes)
  rng = np.random.default_rng(sum(kernel) + chunk_bytes)
  x = jnp.asarray(rng.normal(size=(2, 13, 11, 4)).astype(np.float32))
  k = jnp.asarray(rng.normal(size=(*kernel, 1, 4)).astype(np.float32))
  y = _grouped_conv(x, k, padding)
  cot = jnp.asarray(rng.normal(size=y.shape).astype(np.float32))
  want = jax.grad(lambda x, k: jnp.sum(_grouped_conv(x, k, padding) * cot), (0, 1))(x, k)
  with layers.depthwise_impl("shift"):
    fn = lambda x, k: jnp.sum(layers.depthwise_shift_add(x, k, padding=padding) * cot)
    assert "custom_vjp_call" in str(jax.make_jaxpr(fn)(x, k))
    np.testing.assert_allclose(np.asarray(layers.depthwise_shift_add(x, k, padding=padding)),
                               np.asarray(y), rtol=1e-5, atol=1e-5)
    got = jax.jit(jax.grad(fn, (0, 1)))(x, k)
    with layers.reference_forms():   # a new function: traces are cached per function
      fn = lambda x, k: jnp.sum(layers.depthwise_shift_add(x, k, padding=padding) * cot)
      assert "custom_vjp_call" not in str(jax.make_jaxpr(fn)(x, k))
      ref = jax.grad(fn, (0, 1))(x, k)
  for g, w, r in zip(got, want, ref):
    assert g.shape == w.shape
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4, atol=1e-4)


def test_depthwise_gradient_checks_against_finite_differences(monkeypatch):
  monkeypatch.setattr(layers, "_KERNEL_GRAD_CHUNK_BYTES", 200)   # several chunks
  rng = np.random.default_rng(9)
  with jax.enable_x64(), layers.depthwise_impl("shift"):
    x = jnp.asarray(rng.normal(size=(1, 7, 5, 3)))
    k = jnp.asarray(rng.normal(size=(3, 5, 1, 3)))
    check_grads(lambda x, k: layers.depthwise_shift_add(x, k, padding=((1, 1), (2, 2))) ** 2,
                (x, k), order=1, modes=["rev"], atol=1e-6, rtol=1e-6)


def test_strided_and_dilated_depthwise_convs_keep_jax_gradient():
  x = jnp.ones((1, 8, 8, 2))
  k = jnp.ones((3, 3, 1, 2))
  with layers.depthwise_impl("shift"):
    for kwargs in (dict(stride=(2, 2)), dict(dilation=(2, 2)), dict(padding=((3, 3), (0, 0)))):
      fn = lambda x: layers.depthwise_shift_add(x, k, **kwargs)
      assert "custom_vjp_call" not in str(jax.make_jaxpr(fn)(x)), kwargs


def test_depthwise_gradient_in_bfloat16_keeps_the_dtypes():
  rng = np.random.default_rng(10)
  x = jnp.asarray(rng.normal(size=(2, 6, 6, 4)), jnp.bfloat16)
  k = jnp.asarray(rng.normal(size=(3, 3, 1, 4)), jnp.bfloat16)
  pad = ((1, 1), (1, 1))
  with layers.depthwise_impl("shift"):
    gx, gk = jax.grad(lambda x, k: jnp.sum(layers.depthwise_shift_add(x, k, padding=pad)
                                           .astype(jnp.float32) ** 2), (0, 1))(x, k)
  wx, wk = jax.grad(lambda x, k: jnp.sum(_grouped_conv(x, k, pad).astype(jnp.float32) ** 2),
                    (0, 1))(x.astype(jnp.float32), k.astype(jnp.float32))
  assert gx.dtype == gk.dtype == jnp.bfloat16
  for g, w in ((gx, wx), (gk, wk)):
    scale = float(jnp.abs(w).max())
    assert float(jnp.abs(g.astype(jnp.float32) - w).max()) <= 0.05 * scale


# ---------------------------------------------------------------------------
# GELU: the hand-written gradient.
# ---------------------------------------------------------------------------

def test_gelu_gradient_equals_autodiff_of_the_erf_form():
  x = jnp.linspace(-8.0, 8.0, 1601, dtype=jnp.float32)
  want = jax.grad(lambda x: jnp.sum(nn.gelu(x, approximate=False) * jnp.cos(x)))(x)
  with layers.depthwise_impl("shift"):
    fn = lambda x: jnp.sum(layers.gelu(x) * jnp.cos(x))
    assert "custom_vjp_call" in str(jax.make_jaxpr(fn)(x))
    np.testing.assert_array_equal(np.asarray(layers.gelu(x)),
                                  np.asarray(nn.gelu(x, approximate=False)))
    got = jax.jit(jax.grad(fn))(x)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
  with layers.depthwise_impl("conv"):     # accelerators keep jax's own derivative
    assert "custom_vjp_call" not in str(jax.make_jaxpr(lambda x: layers.gelu(x))(x))
  with jax.enable_x64(), layers.depthwise_impl("shift"):
    check_grads(layers.gelu, (jnp.linspace(-5.0, 5.0, 41),), order=1, modes=["rev"])
  with layers.depthwise_impl("shift"):
    gb = jax.grad(lambda x: jnp.sum(layers.gelu(x).astype(jnp.float32)))(x.astype(jnp.bfloat16))
  assert gb.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(gb, np.float32),
                             np.asarray(jax.grad(lambda x: jnp.sum(nn.gelu(x, False)))(x)),
                             atol=0.02)
