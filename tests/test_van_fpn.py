"""VAN backbones, the FPN neck and the Semantic-FPN head, and VAN checkpoint conversion.

Parity against the official PyTorch forward (fixtures ``van_b0`` and
``fpn_fpnhead``), parameter counts against the published VAN figures, the torch
nearest rule of the FPN top-down path on odd sizes, level shapes of odd inputs,
and converting VAN-Classification (ImageNet) and mmseg ``projects/van``
checkpoints with the convert command.
"""

from __future__ import annotations

import collections
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_conversion import write_torch_file   # the torch-free torch.save writer

from offseg_jax import convert
from offseg_jax.conversion import core, van_names, variables_io
from offseg_jax.models import fpn, layers, segmentor, van
from offseg_jax.registry import BACKBONES, HEADS, MODELS, NECKS
from offseg_jax.tools import parity

REPO = Path(__file__).resolve().parents[1]
PARITY = Path(os.environ.get("OFFSEG_SHARED", REPO.parent / "shared")) / "parity"

# VAN-Classification README (ImageNet-1K, with the 1000-class head), in millions.
PUBLISHED_PARAMS_M = {"b0": 4.1, "b1": 13.9, "b2": 26.6, "b3": 44.8}


def _param_count(module, *args) -> int:
  variables = jax.eval_shape(lambda *a: module.init(jax.random.key(0), *a), *args)
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables["params"]))


def _image_spec(h, w):
  return jax.ShapeDtypeStruct((1, h, w, 3), jnp.float32)


# ---------------------------------------------------------------------------
# Parity with the official PyTorch code.
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["van_b0", "fpn_fpnhead"])
def test_parity_fixture(name):
  if not (PARITY / f"{name}.npz").exists():
    pytest.skip(f"parity fixture {name} not found under {PARITY}")
  result = parity.check_fixture(PARITY / f"{name}.npz")
  print(json.dumps(result["errors"]))
  expected = json.loads((PARITY / f"{name}.json").read_text())["parity"]["compare"]
  assert set(result["errors"]) == set(expected)
  assert result["pass"], result


def test_fixture_parameter_counts():
  """Our modules hold exactly the official parameters (buffers excluded)."""
  if not (PARITY / "van_b0.json").exists():
    pytest.skip(f"parity fixtures not found under {PARITY}")
  van_meta = json.loads((PARITY / "van_b0.json").read_text())
  backbone = BACKBONES.get("van_b0").from_official(van_meta["parity"]["official_config"], None)
  assert _param_count(backbone, _image_spec(64, 64)) == van_meta["params"]["num_params"]

  fpn_meta = json.loads((PARITY / "fpn_fpnhead.json").read_text())
  head = HEADS.get("fpn_fpnhead").from_official(fpn_meta["parity"]["official_config"], 19)
  levels = tuple(jax.ShapeDtypeStruct((1, 64 // 2 ** i, 128 // 2 ** i, c), jnp.float32)
                 for i, c in enumerate((32, 64, 160, 256)))
  assert _param_count(head, levels) == fpn_meta["params"]["num_params"]


@pytest.mark.parametrize("size", sorted(PUBLISHED_PARAMS_M))
def test_van_parameter_counts_match_the_published_figures(size):
  """Published figures include the ImageNet classifier, a Linear(C4 -> 1000).

  Our segmentation backbone has no classifier, so its C4 * 1000 + 1000
  parameters are added before comparing (VAN-B0: 3.85 M + 0.26 M = 4.1 M).
  """
  backbone = BACKBONES.build(f"van_{size}")
  count = _param_count(backbone, _image_spec(64, 64))
  c4 = van.VAN_SIZES[size]["embed_dims"][-1]
  with_head = count + c4 * 1000 + 1000
  print(f"VAN-{size.upper()}: backbone {count:,}, with ImageNet head {with_head:,}")
  assert round(with_head / 1e6, 1) == PUBLISHED_PARAMS_M[size]


# ---------------------------------------------------------------------------
# Official configs.
# ---------------------------------------------------------------------------

def test_from_official_maps_fields_and_refuses_unported_options():
  for name in ("van", "van_b0", "van_b1", "van_b2"):
    assert BACKBONES.get(name).from_official is van.van_from_official
  cfg = {"type": "VAN", "embed_dims": [64, 128, 320, 512], "depths": [2, 2, 4, 2],
         "drop_path_rate": 0.1, "norm_cfg": {"type": "SyncBN", "requires_grad": True},
         "init_cfg": {"type": "Pretrained", "checkpoint": "van_b1.pth"}}
  model = van.van_from_official(cfg)
  assert model.embed_dims == (64, 128, 320, 512) and model.depths == (2, 2, 4, 2)
  assert model.mlp_ratios == (8, 8, 4, 4) and model.drop_path_rate == 0.1
  for bad, option in (({"linear": True}, "linear"),
                      ({"norm_cfg": {"type": "GN", "num_groups": 8}}, "norm_cfg"),
                      ({"act_cfg": {"type": "ReLU"}}, "act_cfg"),
                      ({"num_stages": 3}, "num_stages"),
                      ({"out_indices": (0, 1)}, "out_indices")):
    with pytest.raises(ValueError, match=option):
      van.van_from_official({**cfg, **bad})

  neck = {"type": "FPN", "in_channels": [64, 128, 320, 512], "out_channels": 256,
          "num_outs": 4}
  built = NECKS.get("fpn").from_official(neck, None)
  assert built.out_channels == 256 and built.num_outs == 4 and built.upsample_mode == "nearest"
  assert built.norm is None and built.act is None       # mmseg FPN: plain convs with bias
  with pytest.raises(ValueError, match="scale_factor"):
    fpn.fpn_from_official({**neck, "upsample_cfg": {"mode": "nearest", "scale_factor": 2}})
  head = {"type": "FPNHead", "in_channels": [256] * 4, "in_index": [0, 1, 2, 3],
          "feature_strides": [4, 8, 16, 32], "channels": 128, "num_classes": 150,
          "norm_cfg": {"type": "SyncBN"}}
  semantic = fpn.semantic_fpn_from_official({"neck": neck, "decode_head": head}, None)
  assert semantic.decode_head.num_classes == 150 and semantic.decode_head.channels == 128
  with pytest.raises(ValueError, match="out_channels 256"):
    fpn.semantic_fpn_from_official(
        {"neck": neck, "decode_head": {**head, "in_channels": [128] * 4}}, 150)
  with pytest.raises(ValueError, match="align_corners"):
    fpn.fpn_head_from_official({**head, "align_corners": True}, 150)


# ---------------------------------------------------------------------------
# FPN semantics on odd sizes.
# ---------------------------------------------------------------------------

ODD_LEVELS = ((25, 35), (13, 18), (7, 9), (4, 5))   # VAN strides of a 100x140 image


def test_fpn_top_down_uses_the_torch_nearest_rule_on_odd_sizes():
  """With identity convs, output i = x_i + nearest(output i+1), source floor(dst*in/out)."""
  c = 4
  rng = np.random.default_rng(0)
  xs = tuple(rng.standard_normal((1, h, w, c)).astype(np.float32) for h, w in ODD_LEVELS)
  neck = fpn.FPN(out_channels=c)
  template = jax.eval_shape(lambda f: neck.init(jax.random.key(0), f), xs)
  eye = np.eye(c, dtype=np.float32)
  center = np.zeros((3, 3, c, c), np.float32)
  center[1, 1] = eye
  params = {name: {"conv": {"kernel": eye[None, None] if name.startswith("lateral")
                            else center, "bias": np.zeros(c, np.float32)}}
            for name in template["params"]}
  outs = jax.jit(neck.apply)({"params": params}, xs)

  def nearest(x, size):   # the torch rule, in exact integer arithmetic
    rows = np.arange(size[0]) * x.shape[1] // size[0]
    cols = np.arange(size[1]) * x.shape[2] // size[1]
    return x[:, rows][:, :, cols]

  expected = [None] * 4
  expected[3] = xs[3]
  for i in (2, 1, 0):
    expected[i] = xs[i] + nearest(expected[i + 1], ODD_LEVELS[i])
  for ours, ref in zip(outs, expected):
    np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-5)
  # A plain 2x repeat would not even fit: 2 * 13 != 25.
  assert 2 * ODD_LEVELS[1][0] != ODD_LEVELS[0][0]


def test_fpn_extra_levels_by_pooling_and_by_convs():
  xs = tuple(jax.ShapeDtypeStruct((1, h, w, 8), jnp.float32) for h, w in ODD_LEVELS)
  expected = [(1, h, w, 16) for h, w in ODD_LEVELS] + [(1, 2, 3, 16), (1, 1, 2, 16)]
  for extra in (False, "on_input", "on_output"):
    neck = fpn.FPN(out_channels=16, num_outs=6, add_extra_convs=extra)
    variables = jax.eval_shape(lambda f, n=neck: n.init(jax.random.key(0), f), xs)
    outs = jax.eval_shape(lambda v, f, n=neck: n.apply(v, f), variables, xs)
    assert [o.shape for o in outs] == expected, extra
    has_extra_convs = "fpn_convs.5" in variables["params"]
    assert has_extra_convs == bool(extra)


# ---------------------------------------------------------------------------
# A small VAN + FPN + FPNHead segmentor: odd sizes, training, conversion.
# ---------------------------------------------------------------------------

TINY = "test_van_fpn_tiny"
TINY_VAN = dict(embed_dims=(8, 16, 24, 32), depths=(1, 1, 2, 1), mlp_ratios=(2, 2, 2, 2),
                drop_path_rate=0.1)


def _tiny_model(num_classes: int = 5):
  return segmentor.EncoderDecoder(
      backbone=van.VAN(**TINY_VAN),
      neck=fpn.FPN(out_channels=16),
      decode_head=fpn.FPNHead(num_classes, channels=8))


if TINY not in MODELS:
  MODELS.register(TINY)(_tiny_model)


def _random_variables(model, images, seed=0):
  template = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), images)
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map_with_path(
      lambda p, s: (rng.uniform(0.5, 2.0, s.shape) if p[-1].key == "var"
                    else 0.3 * rng.standard_normal(s.shape)).astype(np.float32), template)


def test_odd_input_gives_the_expected_level_shapes():
  """VAN-B0 + FPN 256 + FPNHead 128 on 100x140: levels at ceil-ish strides, logits at 1/4."""
  head = HEADS.build("fpn_fpnhead", 19, out_channels=256, channels=128)
  full = segmentor.EncoderDecoder(backbone=BACKBONES.build("van_b0"), decode_head=head)
  images = _image_spec(100, 140)
  variables = jax.eval_shape(lambda x: full.init(jax.random.key(0), x), images)
  logits, aux = jax.eval_shape(full.apply, variables, images)
  assert [f.shape for f in aux["backbone"]] == [
      (1, h, w, c) for (h, w), c in zip(ODD_LEVELS, (32, 64, 160, 256))]
  assert [f.shape for f in aux["neck"]] == [(1, h, w, 256) for h, w in ODD_LEVELS]
  assert logits.shape == (1, 25, 35, 19)      # stride 4: the finest level's grid


def test_training_forward_on_an_odd_size():
  """A jitted training forward: odd sizes run, BN stats update, DropPath/Dropout2d act."""
  images = np.random.default_rng(2).standard_normal((2, 100, 140, 3)).astype(np.float32)
  model = MODELS.build(TINY, num_classes=5)
  variables = _random_variables(model, _image_spec(100, 140))

  # Grouped convs compile faster than the CPU shift path; the parity tests
  # cover the default path.
  with layers.depthwise_impl("conv"):
    @jax.jit
    def train_step(v, key):
      (logits, aux), updates = model.apply(v, images, train=True, rngs={"dropout": key},
                                           mutable=["batch_stats"])
      return logits, aux["neck"], updates["batch_stats"]

    a, neck, stats = train_step(variables, jax.random.key(0))
    b, _, _ = train_step(variables, jax.random.key(1))
  assert [f.shape for f in neck] == [(2, h, w, 16) for h, w in ODD_LEVELS]
  assert a.shape == (2, 25, 35, 5) and np.isfinite(np.asarray(a)).all()
  # Stochastic depth and Dropout2d make two keys give two different outputs.
  assert not np.allclose(np.asarray(a), np.asarray(b))
  before = variables["batch_stats"]["backbone"]["block1.0"]["norm1"]["mean"]
  after = stats["backbone"]["block1.0"]["norm1"]["mean"]
  assert not np.allclose(before, after)


# ---------------------------------------------------------------------------
# Checkpoint key layouts and the convert command.
# ---------------------------------------------------------------------------

def _backbone_state(variables) -> collections.OrderedDict:
  """The bare-key state dict of the tiny VAN (VAN-Classification naming)."""
  bb = {c: variables[c]["backbone"] for c in ("params", "batch_stats")}
  state = collections.OrderedDict(core.flax_to_torch(bb))
  for key in [k for k in state if k.endswith(".running_var")]:
    state[key[: -len("running_var")] + "num_batches_tracked"] = np.array(0, np.int64)
  return state


def test_van_key_rewrite_is_pure_and_targeted():
  state = collections.OrderedDict([
      ("patch_embed1.proj.weight", 1), ("block1.0.attn.spatial_gating_unit.conv_spatial.weight", 2),
      ("block1.0.mlp.dwconv.weight", 3), ("block1.0.mlp.dwconv.bias", 4),
      ("block2.3.mlp.dwconv.dwconv.weight", 5), ("norm1.weight", 6),
      ("head.weight", 7), ("head.bias", 8)])
  original = dict(state)
  assert van_names.is_van_state_dict(state)
  out, changes = van_names.van_state_dict_to_ours(state)
  assert dict(state) == original                           # input untouched
  assert list(out) == ["patch_embed1.proj.weight",
                       "block1.0.attn.spatial_gating_unit.conv_spatial.weight",
                       "block1.0.mlp.dwconv.dwconv.weight", "block1.0.mlp.dwconv.dwconv.bias",
                       "block2.3.mlp.dwconv.dwconv.weight", "norm1.weight"]
  assert out["block1.0.mlp.dwconv.dwconv.bias"] == 4
  assert changes["dropped"] == ["head.weight", "head.bias"]
  assert changes["renamed"] == {"block1.0.mlp.dwconv.weight": "block1.0.mlp.dwconv.dwconv.weight",
                                "block1.0.mlp.dwconv.bias": "block1.0.mlp.dwconv.dwconv.bias"}
  # Prefixed (segmentor) keys are renamed too; a decode head's keys are kept.
  prefixed, changes = van_names.van_state_dict_to_ours(
      {"backbone.block1.0.mlp.dwconv.weight": 1, "decode_head.conv_seg.weight": 2})
  assert set(prefixed) == {"backbone.block1.0.mlp.dwconv.dwconv.weight",
                           "decode_head.conv_seg.weight"}
  assert not changes["dropped"]
  # Other models are not VAN (MSCAN has strip convs, not conv_spatial).
  assert not van_names.is_van_state_dict({"block1.0.attn.spatial_gating_unit.conv0_1.weight": 0})


@pytest.fixture(scope="module")
def tiny_weights():
  model = MODELS.build(TINY, num_classes=5)
  return model, _random_variables(model, _image_spec(64, 64), seed=3)


def _assert_trees_equal(ours, ref):
  assert jax.tree.structure(ours) == jax.tree.structure(ref)
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_convert_imagenet_van_checkpoint_for_fine_tuning(tiny_weights, tmp_path, capsys):
  _, variables = tiny_weights
  state = _backbone_state(variables)
  state["head.weight"] = np.ones((10, 32), np.float32)     # ImageNet classifier
  state["head.bias"] = np.zeros(10, np.float32)
  write_torch_file(tmp_path / "van_tiny.pth", {"state_dict": state})
  out = tmp_path / "bb"
  assert convert.main(["--model", TINY, "--backbone-only", str(tmp_path / "van_tiny.pth"),
                       str(out)]) == 0
  log = capsys.readouterr().out
  assert "head.weight" in log and "missing" not in log and "unexpected" not in log
  meta = variables_io.load_meta(out)
  assert meta["report"]["missing"] == [] and meta["report"]["unexpected"] == []
  loaded = variables_io.load_variables(out)
  _assert_trees_equal(loaded, {c: {"backbone": variables[c]["backbone"]}
                               for c in ("params", "batch_stats")})


def test_convert_names_missing_and_unexpected_van_keys(tiny_weights, tmp_path, capsys):
  _, variables = tiny_weights
  state = _backbone_state(variables)
  del state["block3.1.attn.spatial_gating_unit.conv1.bias"]
  state["block3.1.attn.extra.weight"] = np.ones(3, np.float32)
  state["head.weight"] = np.ones((10, 32), np.float32)
  write_torch_file(tmp_path / "bad.pth", {"state_dict": state})
  rc = convert.main(["--model", TINY, "--backbone-only", str(tmp_path / "bad.pth"),
                     str(tmp_path / "out")])
  captured = capsys.readouterr()
  assert rc == 1
  assert "backbone.block3.1.attn.spatial_gating_unit.conv1.bias" in captured.out
  assert "backbone.block3.1.attn.extra.weight" in captured.out
  assert "not used" in captured.err
  assert not variables_io.is_converted_checkpoint(tmp_path / "out")


def test_convert_mmseg_projects_van_segmentor_checkpoint(tiny_weights, tmp_path, capsys):
  _, variables = tiny_weights
  state = collections.OrderedDict(
      (k.replace(".mlp.dwconv.dwconv.", ".mlp.dwconv."), v)
      for k, v in core.flax_to_torch(variables).items())
  assert any(k.endswith("mlp.dwconv.weight") for k in state)
  write_torch_file(tmp_path / "mmseg.pth", {"state_dict": state, "meta": {"iter": 1}})
  out = tmp_path / "full"
  assert convert.main(["--model", TINY, "--num-classes", "5", str(tmp_path / "mmseg.pth"),
                       str(out)]) == 0
  assert "renamed 10 mmseg 'mlp.dwconv' keys" in capsys.readouterr().out
  _assert_trees_equal(variables_io.load_variables(out), variables)
