"""Torch-semantics primitives: resizes, conv padding, norms, converter naming."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from offseg_jax import models
from offseg_jax.conversion import core
from offseg_jax.models import layers, segmentor, tiny


def _torch_bilinear_1d(n_in, n_out):
  """Direct transcription of torch's align_corners=False source index rule."""
  m = np.zeros((n_out, n_in))
  scale = n_in / n_out
  for d in range(n_out):
    s = max((d + 0.5) * scale - 0.5, 0.0)
    i0 = min(int(np.floor(s)), n_in - 1)
    i1 = min(i0 + 1, n_in - 1)
    f = s - i0
    m[d, i0] += 1 - f
    m[d, i1] += f
  return m


@pytest.mark.parametrize("src,dst", [((5, 7), (10, 3)), ((8, 8), (32, 32)), ((33, 17), (11, 40))])
def test_resize_bilinear_matches_torch_rule(src, dst):
  x = np.random.default_rng(0).normal(size=(2, *src, 3)).astype(np.float32)
  my, mx = _torch_bilinear_1d(src[0], dst[0]), _torch_bilinear_1d(src[1], dst[1])
  want = np.einsum("yh,bhwc,xw->byxc", my, x, mx)
  got = np.asarray(layers.resize_bilinear(jnp.asarray(x), dst))
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_resize_bilinear_matches_torch_when_available():
  torch = pytest.importorskip("torch")
  x = np.random.default_rng(1).normal(size=(1, 9, 14, 2)).astype(np.float32)
  for size in [(4, 5), (20, 31), (9, 7)]:
    want = torch.nn.functional.interpolate(torch.from_numpy(x.transpose(0, 3, 1, 2)), size=size,
                                           mode="bilinear", align_corners=False)
    got = layers.resize_bilinear(jnp.asarray(x), size)
    np.testing.assert_allclose(np.asarray(got), want.numpy().transpose(0, 2, 3, 1), atol=1e-5)


def test_resize_nearest_uses_floor_of_scaled_index():
  x = jnp.arange(5)[None, :, None, None] * jnp.ones((1, 1, 3, 1), jnp.int32)
  out = layers.resize_nearest(x, (3, 3))[0, :, 0, 0]
  # torch: src = floor(dst * 5 / 3) = 0, 1, 3 (jax.image.resize would give 0, 2, 4).
  assert out.tolist() == [0, 1, 3]


def test_conv_pads_symmetrically_at_stride_two():
  x = jnp.ones((1, 6, 6, 1))
  conv = layers.Conv2d(1, 3, stride=2, padding=1, use_bias=False)
  v = {"params": {"kernel": jnp.ones((3, 3, 1, 1))}}
  out = conv.apply(v, x)[0, :, :, 0]
  # Symmetric padding: the top-left output sees a 2x2 corner (4), not 3x3 (9).
  assert out.shape == (3, 3) and float(out[0, 0]) == 4.0 and float(out[1, 1]) == 9.0


def test_groupnorm_matches_numpy():
  x = np.random.default_rng(2).normal(size=(2, 4, 5, 8)).astype(np.float32)
  gn = layers.GroupNorm(4)
  v = gn.init(jax.random.PRNGKey(0), x)
  got = np.asarray(gn.apply(v, x))
  g = x.reshape(2, 4, 5, 4, 2)
  want = ((g - g.mean(axis=(1, 2, 4), keepdims=True))
          / np.sqrt(g.var(axis=(1, 2, 4), keepdims=True) + 1e-5)).reshape(x.shape)
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_batchnorm_updates_running_stats_like_torch():
  x = np.random.default_rng(3).normal(2.0, 3.0, size=(4, 3, 3, 2)).astype(np.float32)
  bn = layers.BatchNorm()
  v = bn.init(jax.random.PRNGKey(0), x, False)
  y, upd = bn.apply(v, x, True, mutable=["batch_stats"])
  flat = x.reshape(-1, 2)
  np.testing.assert_allclose(upd["batch_stats"]["mean"], 0.1 * flat.mean(0), rtol=1e-5)
  # torch uses the unbiased variance for the running estimate.
  np.testing.assert_allclose(upd["batch_stats"]["var"], 0.9 + 0.1 * flat.var(0, ddof=1), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(y).reshape(-1, 2).std(0), 1.0, atol=1e-3)


def test_converter_maps_names_and_layouts_and_reports_problems():
  module = layers.ConvModule(4, 3, padding=1, norm="bn")
  template = jax.eval_shape(module.init, jax.random.PRNGKey(0), jnp.zeros((1, 5, 5, 2)))
  rng = np.random.default_rng(0)
  state = {"conv.weight": rng.normal(size=(4, 2, 3, 3)).astype(np.float32),
           "bn.weight": np.ones(4, np.float32), "bn.bias": np.zeros(4, np.float32),
           "bn.running_mean": np.arange(4, dtype=np.float32),
           "bn.running_var": np.ones(4, np.float32),
           "bn.num_batches_tracked": np.zeros((), np.int64)}
  variables, report = core.torch_to_flax(state, template)
  np.testing.assert_array_equal(variables["params"]["conv"]["kernel"],
                                state["conv.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(variables["batch_stats"]["bn"]["mean"], np.arange(4))
  assert report["ignored"] == ["bn.num_batches_tracked"] and not report["unexpected"]
  back = core.flax_to_torch(variables)
  np.testing.assert_array_equal(back["conv.weight"], state["conv.weight"])
  with pytest.raises(core.ConversionError, match="bn.running_var"):
    core.torch_to_flax({k: v for k, v in state.items() if k != "bn.running_var"}, template)
  with pytest.raises(core.ConversionError, match="extra.weight"):
    core.torch_to_flax(dict(state, **{"extra.weight": np.zeros(1)}), template)
  with pytest.raises(core.ConversionError, match="conv.weight"):
    core.torch_to_flax(dict(state, **{"conv.weight": np.zeros((4, 2, 1, 1))}), template)


@pytest.mark.parametrize("kernel,stride,padding,dilation", [
    ((3, 3), 1, 1, 1), ((3, 3), 2, 1, 1), ((1, 7), 1, (0, 3), 1), ((5, 5), 1, 4, 2),
    ((3, 3), 2, ((0, 1), (1, 0)), 1)])
def test_depthwise_shift_add_equals_grouped_convolution(kernel, stride, padding, dilation):
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.normal(size=(2, 9, 11, 6)).astype(np.float32))
  conv = layers.Conv2d(6, kernel, stride, padding, dilation, groups=6)
  v = conv.init(jax.random.PRNGKey(0), x)
  outs = {}
  for impl in ("conv", "shift"):
    with layers.depthwise_impl(impl):
      outs[impl] = np.asarray(conv.apply(v, x))
      g = jax.grad(lambda v: (conv.apply(v, x) ** 2).sum())(v)
      outs[impl + "_grad"] = np.asarray(g["params"]["kernel"])
  np.testing.assert_allclose(outs["shift"], outs["conv"], atol=1e-5)
  np.testing.assert_allclose(outs["shift_grad"], outs["conv_grad"], rtol=1e-4, atol=1e-4)


class _DepthwiseBackbone(nn.Module):
  """A stride-4 stem and one depthwise 3x3 conv: the smallest model with one."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = layers.Conv2d(8, 4, 4, name="stem")(x)
    return (layers.Conv2d(8, 3, padding=1, groups=8, name="dw")(x),)


def _grouped_conv_counts(model, impl_scope=None):
  """feature_group_count of every conv_general_dilated in the model's forward program."""
  x = jnp.zeros((1, 16, 16, 3), jnp.float32)
  variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x))
  with impl_scope or layers.depthwise_impl("auto"):
    text = str(jax.make_jaxpr(lambda v: model.apply(v, x))(variables))
  return [int(n) for n in re.findall(r"feature_group_count=(\d+)", text)]


def _model(conv_impl="auto"):
  return segmentor.EncoderDecoder(backbone=_DepthwiseBackbone(),
                                  decode_head=tiny.TinyFPNHead(3, channels=8),
                                  conv_impl=conv_impl)


def test_conv_impl_field_chooses_the_traced_program(monkeypatch):
  # The environment plays no part any more (it used to: OFFSEG_DEPTHWISE).
  monkeypatch.setenv("OFFSEG_DEPTHWISE", "conv")
  as_conv = _grouped_conv_counts(_model("conv"))
  as_shift = _grouped_conv_counts(_model("shift"))
  assert any(n > 1 for n in as_conv)             # the depthwise conv stays grouped
  assert not any(n > 1 for n in as_shift)        # shifted multiply-adds instead
  if jax.default_backend() == "cpu":             # 'auto' = CPU forms on CPU, env ignored
    assert _grouped_conv_counts(_model("auto")) == as_shift
  # 'auto' defers to an enclosing choice; an explicit field wins over it.
  assert _grouped_conv_counts(_model("auto"), layers.depthwise_impl("conv")) == as_conv
  assert _grouped_conv_counts(_model("shift"), layers.depthwise_impl("conv")) == as_shift


def test_conv_impl_reaches_the_model_from_the_config():
  assert models.build_model({"name": "tiny", "conv_impl": "conv"}, 3).conv_impl == "conv"
  # Configs written before the field existed (checkpoint metadata) still build.
  assert models.build_model({"name": "tiny"}, 3).conv_impl == "auto"
  with pytest.raises(ValueError, match="conv_impl"):
    models.build_model({"name": "tiny", "conv_impl": "depthwise"}, 3)
  with pytest.raises(ValueError, match="conv_impl"):
    with layers.depthwise_impl("grouped"):
      pass


def test_depthwise_impl_is_scoped_and_reads_no_environment(monkeypatch):
  monkeypatch.setenv("OFFSEG_DEPTHWISE", "shift")
  with layers.depthwise_impl("conv"):
    assert not layers.cpu_forms()
    with layers.depthwise_impl("shift"):
      assert layers.cpu_forms()
    assert not layers.cpu_forms()
  assert layers.cpu_forms() == (jax.default_backend() == "cpu")


def test_drop_path_rates_split_one_linear_schedule_by_stage():
  rates = layers.drop_path_rates((2, 3, 1), 0.5)
  assert [len(r) for r in rates] == [2, 3, 1]
  # Bit-equal to indexing one np.linspace over all blocks, as the backbones did.
  assert sum(rates, []) == [float(r) for r in np.linspace(0.0, 0.5, 6)]
  assert layers.drop_path_rates((0,), 0.1) == [[]]


def test_linear_is_flax_dense_with_float32_compute_and_torch_layout():
  x = jnp.ones((2, 3, 5), jnp.bfloat16)
  linear = layers.Linear(4)
  variables = linear.init(jax.random.PRNGKey(0), x)
  assert isinstance(linear, nn.Dense)
  assert jax.tree_util.tree_map(jnp.shape, variables["params"]) == {"kernel": (5, 4), "bias": (4,)}
  assert linear.apply(variables, x).dtype == jnp.float32     # float32 compute by default
  assert layers.Linear(4, dtype=jnp.bfloat16).apply(variables, x).dtype == jnp.bfloat16
