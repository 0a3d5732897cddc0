"""Swin Transformer and ResNetV1c backbones (ECENet / CFT backbones).

Parity against the official mmseg forward (fixtures in shared/parity), parameter
counts against independently derived figures, inputs whose size is not a
multiple of the window / patch, the shifted-window attention against a naive
per-token reference, the PatchMerging channel order, and the refusal of official
options we do not port.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from offseg_jax.conversion.core import flax_to_torch, torch_to_flax
from offseg_jax.models import BACKBONES
from offseg_jax.models import resnet as resnet_lib
from offseg_jax.models import swin as swin_lib
from offseg_jax.tools import parity

_REPO = Path(__file__).resolve().parents[1]
PARITY = Path(os.environ.get("OFFSEG_SHARED", _REPO / ".." / "shared")) / "parity"
FIXTURES = ("swin_e32", "resnet50v1c_d32", "resnet50v1c_d8")


def _fixture(name: str):
  if not (PARITY / f"{name}.npz").exists():
    pytest.skip(f"parity fixture {name}.npz not found under {PARITY} (set OFFSEG_SHARED)")
  meta = json.loads((PARITY / f"{name}.json").read_text())
  return meta, np.load(PARITY / f"{name}.npz")


def _template(model, shape):
  return jax.eval_shape(lambda x: model.init({"params": jax.random.key(0)}, x),
                        jax.ShapeDtypeStruct(shape, jnp.float32))


def _param_count(model, shape=(1, 64, 64, 3)) -> int:
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(_template(model, shape)["params"]))


def _random_variables(model, shape, seed=0):
  """Fan-in-scaled random variables with the model's structure (no slow ``init``)."""
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = path[-1].key
    if name == "var":
      return rng.uniform(0.5, 2.0, leaf.shape).astype(np.float32)
    if name == "kernel":
      std = 1 / np.sqrt(np.prod(leaf.shape[:-1]))
    else:
      std = 0.2
    value = rng.normal(0, std, leaf.shape).astype(np.float32)
    return value + 1 if name == "scale" else value

  return jax.tree_util.tree_map_with_path(fill, _template(model, shape))


# ---------------------------------------------------------------------------
# Parity with the official implementation.
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", FIXTURES)
def test_parity_fixture(name):
  """The same check as ``python -m offseg_jax.tools.parity <fixture>``."""
  _fixture(name)
  result = parity.check_fixture(PARITY / f"{name}.npz")
  print(json.dumps(result["errors"]))
  assert result.get("skipped") is None, result
  assert set(result["errors"]) == {f"backbone/{i}" for i in range(4)}
  assert result["pass"], result


@pytest.mark.parametrize("name", FIXTURES)
def test_fixture_weights_round_trip_and_param_count(name):
  """Every official key maps by name (both ways) and the counts agree with torch's."""
  meta, arrays = _fixture(name)
  header = meta["parity"]
  entry = BACKBONES.get(header["build"])
  model = entry.from_official(header["official_config"], None)
  state = {k[len("state/backbone."):]: arrays[k] for k in arrays.files
           if k.startswith("state/backbone.")}
  variables, report = torch_to_flax(state, _template(model, (1, 64, 64, 3)),
                                    ignore=entry.torch_ignore, strict=True)
  exported = flax_to_torch(variables)
  assert set(exported) == set(state) - set(report["ignored"])
  for key, value in exported.items():
    np.testing.assert_array_equal(value.reshape(state[key].shape), state[key])
  n_params = sum(np.size(a) for a in jax.tree.leaves(variables["params"]))
  assert n_params == meta["params"]["num_params"]


def test_relative_position_index_matches_official_buffer():
  _, arrays = _fixture("swin_e32")
  keys = [k for k in arrays.files if k.endswith("relative_position_index")]
  assert len(keys) == 8
  for key in keys:
    np.testing.assert_array_equal(swin_lib.relative_position_index(7), arrays[key])


# ---------------------------------------------------------------------------
# Parameter counts of the full-size presets.
# ---------------------------------------------------------------------------

def swin_formula(embed, depths, heads, window, patch=4, mlp=4, in_ch=3, head_classes=0):
  """Swin parameters from the architecture (qkv bias, patch norm, 2x merging).

  With ``head_classes`` it counts the classification model (one final LN +
  Linear head, no per-stage norms) whose sizes timm and the Swin paper publish;
  without, mmseg's backbone (``norm0..norm{n-1}``, no head).
  """
  n = in_ch * embed * patch ** 2 + embed + 2 * embed          # patch_embed conv + LN
  for i, (depth, h) in enumerate(zip(depths, heads)):
    c = embed * 2 ** i
    hidden = mlp * c
    block = (2 * c + (3 * c * c + 3 * c) + (c * c + c)          # norm1, qkv, proj
             + (2 * window - 1) ** 2 * h                          # bias table
             + 2 * c + (c * hidden + hidden) + (hidden * c + c))  # norm2, ffn
    n += depth * block
    if i < len(depths) - 1:
      n += 8 * c + 8 * c * c                                      # LN(4C) + Linear(4C, 2C)
  last = embed * 2 ** (len(depths) - 1)
  if head_classes:
    return n + 2 * last + last * head_classes + head_classes
  return n + sum(2 * embed * 2 ** i for i in range(len(depths)))


def resnet_formula(stage_blocks, base=64, stem=64, in_ch=3, deep_stem=True, fc_classes=0):
  """Bottleneck-ResNet parameters (conv weights + BN affine; no running stats)."""
  if deep_stem:
    half = stem // 2
    n = 9 * in_ch * half + 2 * half + 9 * half * half + 2 * half + 9 * half * stem + 2 * stem
  else:
    n = 49 * in_ch * stem + 2 * stem
  inplanes = stem
  for i, blocks in enumerate(stage_blocks):
    p = base * 2 ** i
    for j in range(blocks):
      n += inplanes * p + 2 * p + 9 * p * p + 2 * p + p * 4 * p + 8 * p
      if j == 0:                          # every stage's first block projects (width x4)
        n += inplanes * 4 * p + 8 * p
      inplanes = 4 * p
  return n + (inplanes * fc_classes + fc_classes if fc_classes else 0)


def basic_resnet_formula(stage_blocks, base=64, stem=64, in_ch=3, deep_stem=True,
                         fc_classes=0):
  """BasicBlock-ResNet (depth 18/34) parameters; shortcuts project when the width or
  stride changes (not in the first stage, whose width equals the stem's)."""
  if deep_stem:
    half = stem // 2
    n = 9 * in_ch * half + 2 * half + 9 * half * half + 2 * half + 9 * half * stem + 2 * stem
  else:
    n = 49 * in_ch * stem + 2 * stem
  inplanes = stem
  for i, blocks in enumerate(stage_blocks):
    p = base * 2 ** i
    for j in range(blocks):
      n += 9 * inplanes * p + 2 * p + 9 * p * p + 2 * p
      if j == 0 and (i > 0 or inplanes != p):
        n += inplanes * p + 2 * p
      inplanes = p
  return n + (inplanes * fc_classes + fc_classes if fc_classes else 0)


def test_param_count_formulas_match_published_and_official_counts():
  """The formulas reproduce figures computed by others, so they can judge our presets.

  Sources: torchvision's model docs (ResNet-18 11,689,512; ResNet-34 21,797,672;
  ResNet-50 25,557,032; ResNet-101 44,549,160 parameters, 7x7 stem, 1000-class fc), timm's Swin model cards
  (swin_tiny_patch4_window7_224 28,288,354; swin_base_patch4_window7_224
  87,768,224), and the parity fixtures' ``params.num_params`` counted by torch on
  the official mmseg modules.
  """
  assert resnet_formula((3, 4, 6, 3), deep_stem=False, fc_classes=1000) == 25_557_032
  assert resnet_formula((3, 4, 23, 3), deep_stem=False, fc_classes=1000) == 44_549_160
  assert basic_resnet_formula((2, 2, 2, 2), deep_stem=False, fc_classes=1000) == 11_689_512
  assert basic_resnet_formula((3, 4, 6, 3), deep_stem=False, fc_classes=1000) == 21_797_672
  assert swin_formula(96, (2, 2, 6, 2), (3, 6, 12, 24), 7, head_classes=1000) == 28_288_354
  assert swin_formula(128, (2, 2, 18, 2), (4, 8, 16, 32), 7, head_classes=1000) == 87_768_224
  if (PARITY / "swin_e32.json").exists():
    for name, count in (
        ("swin_e32", swin_formula(32, (2, 2, 2, 2), (1, 2, 4, 8), 7)),
        ("resnet50v1c_d32", resnet_formula((3, 4, 6, 3), base=16, stem=16)),
        ("resnet50v1c_d8", resnet_formula((3, 4, 6, 3), base=16, stem=16))):
      meta = json.loads((PARITY / f"{name}.json").read_text())
      assert count == meta["params"]["num_params"], name


@pytest.mark.parametrize("name, expected", [
    # mmseg Swin-B backbone, window 12 (ECENet): 86,880,376.
    ("swin_b", swin_formula(128, (2, 2, 18, 2), (4, 8, 16, 32), 12)),
    # mmseg ResNetV1c-50 / -101: torchvision's counts without fc, 7x7 stem replaced
    # by the deep stem (+19,232): 23,527,264 and 42,519,392.
    ("resnet50_v1c", resnet_formula((3, 4, 6, 3))),
    ("resnet101_v1c", resnet_formula((3, 4, 23, 3))),
    ("resnet101_v1c_d8", resnet_formula((3, 4, 23, 3))),
])
def test_preset_param_counts(name, expected):
  assert _param_count(BACKBONES.build(name)) == expected


def test_basic_block_depths():
  """Depth 18/34 (BasicBlock) through the same registry entry: counts and shapes."""
  for depth, blocks in ((18, (2, 2, 2, 2)), (34, (3, 4, 6, 3))):
    model = BACKBONES.build("resnet_v1c", depth=depth)
    assert _param_count(model) == basic_resnet_formula(blocks)
  model = BACKBONES.build("resnet_v1c", depth=18, base_channels=8, stem_channels=8)
  shapes = [o.shape for o in jax.eval_shape(
      lambda x: model.init_with_output(jax.random.key(0), x)[0],
      jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32))]
  assert shapes == [(1, 16, 16, 8), (1, 8, 8, 16), (1, 4, 4, 32), (1, 2, 2, 64)]


def test_preset_param_counts_literal():
  """The same figures written out, so a formula slip cannot hide a preset change."""
  assert swin_formula(128, (2, 2, 18, 2), (4, 8, 16, 32), 12) == 86_880_376
  assert resnet_formula((3, 4, 6, 3)) == 23_527_264
  assert resnet_formula((3, 4, 23, 3)) == 42_519_392


# ---------------------------------------------------------------------------
# Input sizes that are not multiples of the patch / window / stride.
# ---------------------------------------------------------------------------

def test_swin_non_window_multiple_input():
  model = BACKBONES.build("swin", embed_dims=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4),
                          window_size=7)
  shape = (2, 100, 76, 3)
  variables = _random_variables(model, shape)
  x = np.random.default_rng(1).normal(size=shape).astype(np.float32)
  outs = jax.jit(model.apply)(variables, x)
  # patch embed pads 100x76 to a multiple of 4 -> 25x19; each merging pads odd
  # sizes: 25x19 -> 13x10 -> 7x5 -> 4x3.
  assert [o.shape for o in outs] == [(2, 25, 19, 16), (2, 13, 10, 32), (2, 7, 5, 64),
                                     (2, 4, 3, 128)]
  assert all(np.isfinite(np.asarray(o)).all() for o in outs)


def test_resnet_non_multiple_input_shapes():
  x = np.random.default_rng(2).normal(size=(1, 100, 76, 3)).astype(np.float32)
  for name, expected in (
      ("resnet50_v1c", [(25, 19), (13, 10), (7, 5), (4, 3)]),
      ("resnet50_v1c_d8", [(25, 19), (13, 10), (13, 10), (13, 10)])):
    model = BACKBONES.build(name, base_channels=8, stem_channels=8)
    outs = jax.jit(model.apply)(_random_variables(model, x.shape), x)
    assert [o.shape[1:3] for o in outs] == expected, name
    assert [o.shape[-1] for o in outs] == [32, 64, 128, 256]


def _naive_shift_window_attention(x, params, w, s, heads):
  """Per-token reference of mmseg's (shifted) window attention (loops, float64).

  Written from the definition rather than with window reshapes: the map is
  zero-padded to a multiple of w, and seen through the cyclic shift a query
  attends to the keys of its w x w window; a key that reached the window by
  wrapping around (on either axis) a different way than the query gets -100.
  """
  b, hgt, wid, c = x.shape
  hp, wp = -(-hgt // w) * w, -(-wid // w) * w
  xp = np.zeros((b, hp, wp, c))
  xp[:, :hgt, :wid] = x
  d = c // heads
  qkv = xp @ params["qkv"]["kernel"] + params["qkv"]["bias"]
  q, k, v = qkv[..., :c], qkv[..., c:2 * c], qkv[..., 2 * c:]
  table = params["relative_position_bias_table"]
  out = np.zeros_like(xp)
  for n in range(b):
    for r in range(hp):
      for col in range(wp):
        # rolled coordinates of this token, and its window there
        rr, rc = (r - s) % hp, (col - s) % wp
        wr, wc = rr // w * w, rc // w * w
        keys = [((i + s) % hp, (j + s) % wp, i - wr, j - wc)
                for i in range(wr, wr + w) for j in range(wc, wc + w)]
        # region along an axis in the rolled frame: wrapped (came from the start
        # of the map) or not; mmseg's 3 slices collapse to this within a window.
        region = lambda i, j: (s > 0 and i >= hp - s, s > 0 and j >= wp - s)  # noqa: E731
        q_region = region(rr, rc)
        for h in range(heads):
          sl = slice(h * d, (h + 1) * d)
          logits = []
          for (kr, kc, ki, kj) in keys:
            rel = (rr - wr - ki + w - 1) * (2 * w - 1) + (rc - wc - kj + w - 1)
            value = q[n, r, col, sl] @ k[n, kr, kc, sl] * d ** -0.5 + table[rel, h]
            if region(wr + ki, wc + kj) != q_region:
              value += -100.0
            logits.append(value)
          p = np.exp(np.array(logits) - max(logits))
          p /= p.sum()
          out[n, r, col, sl] = sum(pi * v[n, kr, kc, sl] for pi, (kr, kc, _, _) in zip(p, keys))
  out = out @ params["proj"]["kernel"] + params["proj"]["bias"]
  return out[:, :hgt, :wid]


@pytest.mark.parametrize("shift", [0, 2])
def test_shift_window_attention_matches_naive_reference(shift):
  w, heads, shape = 4, 2, (1, 9, 6, 8)          # 9x6 pads to 12x8: 6 windows
  module = swin_lib.ShiftWindowMSA(heads, w, shift)
  variables = _random_variables(module, shape, seed=3)
  x = np.random.default_rng(4).normal(size=shape).astype(np.float32)
  with jax.default_matmul_precision("highest"):
    ours = np.asarray(jax.jit(module.apply)(variables, x))
  params = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"]["w_msa"])
  ref = _naive_shift_window_attention(x.astype(np.float64), params, w, shift, heads)
  np.testing.assert_allclose(ours, ref, atol=1e-4)


def test_window_padding_is_attended_zeros():
  """Attention on H x W equals attention on the zero-padded map, cropped (mmseg pads
  before shifting and masks only across shifted-window borders, not the padding)."""
  w, shape = 7, (1, 10, 12, 8)
  module = swin_lib.ShiftWindowMSA(2, w, 3)
  variables = _random_variables(module, shape, seed=5)
  x = np.random.default_rng(6).normal(size=shape).astype(np.float32)
  padded = np.pad(x, ((0, 0), (0, 4), (0, 2), (0, 0)))
  a = np.asarray(module.apply(variables, x))
  b = np.asarray(module.apply(variables, padded))[:, :10, :12]
  np.testing.assert_allclose(a, b, atol=1e-5)


def test_patch_merging_uses_unfold_channel_order_and_pads_odd_sizes():
  c, shape = 3, (1, 5, 4, 3)
  module = swin_lib.PatchMerging(4 * c, patch_norm=False)
  x = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
  variables = {"params": {"reduction": {"kernel": np.eye(4 * c, dtype=np.float32)}}}
  out = np.asarray(module.apply(variables, x))
  assert out.shape == (1, 3, 2, 4 * c)       # 5 rows -> padded to 6 -> 3
  padded = np.pad(x, ((0, 0), (0, 1), (0, 0), (0, 0)))
  for i in range(3):
    for j in range(2):
      for ch in range(c):
        for dy in range(2):
          for dx in range(2):
            assert out[0, i, j, ch * 4 + dy * 2 + dx] == padded[0, 2 * i + dy, 2 * j + dx, ch]


def test_shift_mask_blocks_only_wrapped_neighbours():
  mask = swin_lib.shifted_window_mask(14, 14, 7, 3)
  assert mask.shape == (4, 49, 49)
  assert set(np.unique(mask)) == {0.0, -100.0}
  assert not mask[0].any()                      # top-left window: nothing wrapped
  np.testing.assert_array_equal(mask, mask.transpose(0, 2, 1))


# ---------------------------------------------------------------------------
# ResNet dilations, norm_eval, training forwards.
# ---------------------------------------------------------------------------

def test_contract_dilation_and_multi_grid():
  assert resnet_lib.block_dilations(6, 2, True) == (1, 2, 2, 2, 2, 2)
  assert resnet_lib.block_dilations(3, 4, True) == (2, 4, 4)
  assert resnet_lib.block_dilations(3, 4, False) == (4, 4, 4)
  assert resnet_lib.block_dilations(3, 1, True) == (1, 1, 1)
  assert resnet_lib.block_dilations(3, 4, True, (1, 2, 4)) == (1, 2, 4)


def test_resnet_norm_eval_freezes_statistics_in_training():
  model = BACKBONES.build("resnet_v1c", depth=50, num_stages=2, strides=(1, 2),
                          dilations=(1, 1), out_indices=(0, 1), base_channels=4,
                          stem_channels=8, norm_eval=True)
  shape = (2, 32, 32, 3)
  variables = _random_variables(model, shape)
  x = np.random.default_rng(7).normal(size=shape).astype(np.float32)
  outs, updates = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(
      variables, x)
  for a, b in zip(jax.tree.leaves(updates["batch_stats"]),
                  jax.tree.leaves(variables["batch_stats"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  evals = jax.jit(model.apply)(variables, x)
  for a, b in zip(outs, evals):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_swin_training_forward_uses_drop_path():
  # One stage of two blocks: block 1 drops its branches with probability 0.5.
  model = BACKBONES.build("swin", embed_dims=8, depths=(2,), num_heads=(1,), strides=(4,),
                          window_size=4, out_indices=(0,), drop_path_rate=0.5)
  shape = (4, 16, 16, 3)
  variables = _random_variables(model, shape)
  x = np.random.default_rng(8).normal(size=shape).astype(np.float32)
  run = jax.jit(lambda v, x, key: model.apply(v, x, train=True, rngs={"dropout": key}))
  a = run(variables, x, jax.random.key(0))
  b = run(variables, x, jax.random.key(1))
  assert [o.shape for o in a] == [(4, 4, 4, 8)]
  assert not np.allclose(np.asarray(a[0]), np.asarray(b[0]))   # stochastic depth active
  # Without stochastic depth (and no BatchNorm in Swin) training equals eval.
  plain = model.clone(drop_path_rate=0.0)
  trained, evaluated = jax.jit(lambda v, x: (
      plain.apply(v, x, train=True, rngs={"dropout": jax.random.key(0)}),
      plain.apply(v, x)))(variables, x)
  for t, e in zip(trained, evaluated):
    np.testing.assert_allclose(np.asarray(t), np.asarray(e), atol=1e-6)


# ---------------------------------------------------------------------------
# Official configs.
# ---------------------------------------------------------------------------

def test_from_official_reproduces_ecenet_swin_b():
  cfg = dict(type="SwinTransformer", pretrain_img_size=384, embed_dims=128, patch_size=4,
             window_size=12, mlp_ratio=4, depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32],
             strides=(4, 2, 2, 2), out_indices=(0, 1, 2, 3), qkv_bias=True, qk_scale=None,
             patch_norm=True, drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.3,
             use_abs_pos_embed=False, act_cfg=dict(type="GELU"),
             norm_cfg=dict(type="LN", requires_grad=True), with_cp=False, init_cfg=None)
  assert BACKBONES.get("swin").from_official(cfg, 150) == BACKBONES.build("swin_b")


@pytest.mark.parametrize("build, cfg, option", [
    ("swin", {"type": "SwinTransformer", "use_abs_pos_embed": True}, "use_abs_pos_embed"),
    ("swin", {"type": "SwinTransformer", "act_cfg": {"type": "ReLU"}}, "act_cfg"),
    ("swin", {"type": "SwinTransformer", "norm_cfg": {"type": "BN"}}, "norm_cfg"),
    ("swin", {"type": "SwinTransformer", "frozen_stages": 1}, "frozen_stages"),
    ("swin", {"type": "SwinTransformer", "window_sizes": 7}, "window_sizes"),
    ("swin", {"type": "SwinTransformerV2"}, "SwinTransformerV2"),
    ("resnet_v1c", {"type": "ResNetV1d", "depth": 50}, "ResNetV1d"),
    ("resnet_v1c", {"type": "ResNetV1c", "depth": 50, "avg_down": True}, "avg_down"),
    ("resnet_v1c", {"type": "ResNetV1c", "depth": 50, "dcn": {"type": "DCNv2"},
                    "stage_with_dcn": (False, True, True, True)}, "dcn"),
    ("resnet_v1c", {"type": "ResNetV1c", "depth": 50, "norm_cfg": {"type": "GN"}}, "norm_cfg"),
    ("resnet_v1c", {"type": "ResNetV1c", "depth": 26}, "depth"),
    ("resnet_v1c", {"type": "ResNetV1c", "depth": 50, "plugins": [{}]}, "plugins"),
])
def test_from_official_refuses_unported_options(build, cfg, option):
  with pytest.raises(ValueError, match=option):
    BACKBONES.get(build).from_official(cfg, None)
