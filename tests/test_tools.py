"""The parity tool (fixtures -> registered components), the complexity tool and the
command-line conventions every command shares (offseg_jax.cli)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags

from offseg_jax import cli
from offseg_jax.conversion import core
from offseg_jax.models import classifiers, layers, segmentor
from offseg_jax.registry import BACKBONES, BLOCKS, HEADS, MODELS, NECKS
from offseg_jax.tools import complexity, parity
from test_conversion import TinyBackbone   # two BN conv stages with dotted names

REPO = Path(__file__).resolve().parents[1]
PARITY = Path(os.environ.get("OFFSEG_SHARED", REPO.parent / "shared")) / "parity"


# ---------------------------------------------------------------------------
# Tiny registered components to build fixtures for.
# ---------------------------------------------------------------------------

class TinyHead(nn.Module):
  num_classes: int
  classifier: str = "conv"

  @nn.compact
  def __call__(self, feats, train: bool = False):
    x = layers.ConvModule(8, 1, norm="bn", name="squeeze")(
        layers.resize_bilinear(feats[-1], feats[0].shape[1:3]), train)
    x = x + layers.ConvModule(8, 3, padding=1, groups=8, act=None, name="dw")(feats[0], train)
    logits = classifiers.classify(x, kind=self.classifier, num_classes=self.num_classes,
                                  train=train)
    return logits, {"mid": x}


class ScaledProjection(nn.Module):
  """A block with a keyword input: y = (W x + b) * extra_scale."""
  features: int = 3

  @nn.compact
  def __call__(self, x, extra_scale=None):
    y = layers.Conv2d(self.features, 1, name="proj")(x)
    return y if extra_scale is None else y * extra_scale


class TinyNeck(nn.Module):

  @nn.compact
  def __call__(self, feats, train: bool = False):
    return tuple(layers.ConvModule(8, 1, norm="bn", name=f"lateral_convs.{i}")(f, train)
                 for i, f in enumerate(feats))


class TinyNeckHead(nn.Module):
  """Neck + head as one component (official keys ``neck.*``, ``decode_head.*``)."""
  num_classes: int

  @nn.compact
  def __call__(self, feats, train: bool = False):
    neck = TinyNeck(name="neck")(feats, train)
    logits, _ = TinyHead(self.num_classes, name="decode_head")(neck, train)
    return logits, {"neck": neck}


def _tiny_segmentor(num_classes, classifier="conv"):
  return segmentor.EncoderDecoder(backbone=TinyBackbone(),
                                  decode_head=TinyHead(num_classes, classifier))


_REGISTRATIONS = (
    (MODELS, "test_tools_tiny", lambda cfg, k: _tiny_segmentor(k, cfg.get("classifier", "conv")),
     lambda num_classes, classifier="conv": _tiny_segmentor(num_classes, classifier)),
    (BACKBONES, "test_tools_backbone", lambda cfg, k: TinyBackbone(tuple(cfg["widths"])),
     TinyBackbone),
    (HEADS, "test_tools_head", lambda cfg, k: TinyHead(k), TinyHead),
    (NECKS, "test_tools_neck_head", lambda cfg, k: TinyNeckHead(k), TinyNeckHead),
    (BLOCKS, "test_tools_block", lambda cfg, k: ScaledProjection(cfg["features"]),
     ScaledProjection),
)
for _registry, _name, _from_official, _builder in _REGISTRATIONS:
  if _name not in _registry:
    _registry.register(_name, from_official=_from_official)(_builder)


def _random_variables(module, *args, seed=0):
  template = jax.eval_shape(lambda: module.init(jax.random.key(0), *args))
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map_with_path(
      lambda p, s: (rng.uniform(0.5, 2.0, s.shape) if p[-1].key == "var"
                    else rng.standard_normal(s.shape)).astype(np.float32), template)


def _nchw(x):
  return np.asarray(x).transpose(0, 3, 1, 2)


def _write_fixture(directory: Path, name: str, header: dict, arrays: dict) -> Path:
  np.savez(directory / f"{name}.npz", **arrays)
  (directory / f"{name}.json").write_text(json.dumps({"name": name, "parity": header}))
  return directory / f"{name}.npz"


def _state(variables, prefix=""):
  state = {f"state/{k}": v for k, v in core.flax_to_torch(variables, prefix).items()}
  for key in [k for k in state if k.endswith("running_var")]:
    state[key[: -len("running_var")] + "num_batches_tracked"] = np.zeros(1, np.int64)
  return state


@pytest.fixture(scope="module")
def tiny_fixtures(tmp_path_factory):
  """Fixtures in the shared format for each kind of the tiny components."""
  d = tmp_path_factory.mktemp("fixtures")
  rng = np.random.default_rng(0)
  out = {}

  # block: the reference is computed in numpy from the torch-layout weights.
  x = rng.standard_normal((1, 4, 5, 7)).astype(np.float32)                 # NCHW
  scale = np.float32(1.5) * np.ones((1, 1, 1, 3), np.float32)
  weight = rng.standard_normal((3, 4, 1, 1)).astype(np.float32)          # OIHW
  bias = rng.standard_normal(3).astype(np.float32)
  ref = (np.einsum("oi,nihw->nohw", weight[:, :, 0, 0], x) + bias[None, :, None, None]) * 1.5
  out["block"] = _write_fixture(d, "tiny_block", {
      "kind": "block", "build": "test_tools_block", "official_config": {"features": 3},
      "inputs": ["input", "extra/scale"], "compare": {"output": 1e-5}},
      {"input": x, "extra/scale": scale, "output": ref.astype(np.float32),
       "state/proj.weight": weight, "state/proj.bias": bias})

  # segmentor: non-square input, batch 2.
  model = _tiny_segmentor(5)
  images = rng.standard_normal((2, 24, 32, 3)).astype(np.float32)
  variables = _random_variables(model, images, seed=1)
  logits, aux = jax.jit(model.apply)(variables, images)
  full = layers.resize_bilinear(logits, (24, 32))
  classes = np.array([0, 3], np.int64)
  out["segmentor"] = _write_fixture(d, "tiny_segmentor", {
      "kind": "segmentor", "build": "test_tools_tiny", "num_classes": 5,
      "official_config": {"type": "EncoderDecoder"}, "inputs": ["input"],
      "compare": {"logits": 1e-4}},
      {"input": _nchw(images), "logits": _nchw(logits), "logits_full": _nchw(full)[:, classes],
       "logits_full_classes": classes, "pred": np.argmax(full, -1).astype(np.uint8),
       **{f"backbone/{i}": _nchw(f) for i, f in enumerate(aux["backbone"])},
       **_state(variables)})

  # backbone: keys under 'backbone.', as the shared backbone fixtures.
  backbone = TinyBackbone((4, 6))
  bb_vars = _random_variables(backbone, images, seed=2)
  feats = jax.jit(backbone.apply)(bb_vars, images)
  out["backbone"] = _write_fixture(d, "tiny_backbone", {
      "kind": "backbone", "build": "test_tools_backbone", "official_config": {"widths": [4, 6]},
      "inputs": ["input"], "compare": {"backbone/0": 1e-5, "backbone/1": 1e-5}},
      {"input": _nchw(images), **{f"backbone/{i}": _nchw(f) for i, f in enumerate(feats)},
       **_state(bb_vars, "backbone.")})

  # head: the feature maps are input/<i>; it also returns an aux output ('mid').
  head = TinyHead(5)
  feats = (rng.standard_normal((1, 8, 8, 8)).astype(np.float32),
           rng.standard_normal((1, 4, 4, 16)).astype(np.float32))
  head_vars = _random_variables(head, feats, seed=3)
  logits, aux = jax.jit(head.apply)(head_vars, feats)
  out["head"] = _write_fixture(d, "tiny_head", {
      "kind": "head", "build": "test_tools_head", "num_classes": 5, "official_config": {},
      "inputs": ["input/1", "input/0"], "compare": {"logits": 1e-5, "mid": 1e-5}},
      {"input/0": _nchw(feats[0]), "input/1": _nchw(feats[1]), "logits": _nchw(logits),
       "mid": _nchw(aux["mid"]), **_state(head_vars)})

  # neck_head: both prefixes stay; the neck outputs come from the aux dict.
  neck_head = TinyNeckHead(5)
  nh_vars = _random_variables(neck_head, feats, seed=4)
  logits, aux = jax.jit(neck_head.apply)(nh_vars, feats)
  out["neck_head"] = _write_fixture(d, "tiny_neck_head", {
      "kind": "neck_head", "build": "test_tools_neck_head", "num_classes": 5,
      "official_config": {}, "inputs": ["input/0", "input/1"],
      "compare": {"neck/0": 1e-5, "neck/1": 1e-5, "logits": 1e-5}},
      {"input/0": _nchw(feats[0]), "input/1": _nchw(feats[1]), "logits": _nchw(logits),
       **{f"neck/{i}": _nchw(f) for i, f in enumerate(aux["neck"])}, **_state(nh_vars)})

  out["unregistered"] = _write_fixture(d, "tiny_unregistered", {
      "kind": "backbone", "build": "no_such_backbone", "official_config": {},
      "inputs": ["input"], "compare": {"backbone/0": 1e-5}}, {"input": _nchw(images)})
  return out


# ---------------------------------------------------------------------------
# The parity tool on generated fixtures.
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["block", "segmentor", "backbone", "head", "neck_head"])
def test_parity_passes_on_each_fixture_kind(tiny_fixtures, kind):
  result = parity.check_fixture(tiny_fixtures[kind])
  assert result["pass"], result
  expected = {"block": {"output"}, "backbone": {"backbone/0", "backbone/1"},
              "head": {"logits", "mid"}, "neck_head": {"neck/0", "neck/1", "logits"},
              "segmentor": {"logits", "logits_full", "pred"}}[kind]
  assert set(result["errors"]) == expected
  assert all(e <= 1e-5 for e in result["errors"].values()), result
  if kind == "segmentor":
    assert set(result["extra"]) == {"backbone/0", "backbone/1"}


def test_parity_reports_wrong_weights_and_argmax_flips(tiny_fixtures, tmp_path):
  with np.load(tiny_fixtures["segmentor"]) as data:
    arrays = {k: data[k] for k in data.files}
  header = json.loads(tiny_fixtures["segmentor"].with_suffix(".json").read_text())["parity"]
  flipped = dict(arrays, pred=arrays["pred"].copy())
  flipped["pred"][0, 0, :3] = (flipped["pred"][0, 0, :3] + 1) % 5          # 3 of 1536 pixels
  result = parity.check_fixture(_write_fixture(tmp_path, "flips", header, flipped))
  assert result["errors"]["pred"] == pytest.approx(3 / (2 * 24 * 32))
  assert result["failed"] == ["pred"] and not result["pass"]

  perturbed = dict(arrays)
  key = "state/decode_head.squeeze.bn.running_mean"
  perturbed[key] = arrays[key] + 0.5
  result = parity.check_fixture(_write_fixture(tmp_path, "perturbed", header, perturbed))
  assert not result["pass"] and "logits" in result["failed"]
  assert result["errors"]["logits"] > 0.01
  assert result["extra"]["backbone/1"] < 1e-5    # the backbone is untouched


def test_parity_cli_exit_status_and_unregistered_components(tiny_fixtures, capsys):
  paths = [str(tiny_fixtures["block"]), str(tiny_fixtures["unregistered"])]
  assert parity.main(paths) == 1
  lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  assert [r["fixture"] for r in lines] == ["tiny_block", "tiny_unregistered"]
  assert lines[0]["pass"] is True
  assert lines[1] == {"fixture": "tiny_unregistered", "kind": "backbone",
                      "build": "no_such_backbone", "pass": False, "skipped": "not registered",
                      "errors": {}}
  assert parity.main(["--skip-unregistered"] + paths) == 0
  capsys.readouterr()
  with np.load(tiny_fixtures["block"]) as data:
    arrays = {k: data[k] for k in data.files}
  arrays["output"] = arrays["output"] + 1e-3
  header = json.loads(tiny_fixtures["block"].with_suffix(".json").read_text())["parity"]
  bad = _write_fixture(tiny_fixtures["block"].parent, "tiny_block_bad", header, arrays)
  assert parity.main(["--skip-unregistered", str(bad)]) == 1


# ---------------------------------------------------------------------------
# The parity tool on the shared fixtures.
# ---------------------------------------------------------------------------

def _shared_fixtures():
  if not PARITY.is_dir():
    return []
  params = []
  for path in sorted(PARITY.glob("*.json")):
    if path.name == "figures.json" or not path.with_suffix(".npz").exists():
      continue
    kind = json.loads(path.read_text()).get("parity", {}).get("kind")
    # Model-sized forwards take 5-30 s each on 2 cores.
    marks = [pytest.mark.slow] if kind not in ("metric", "block") else []
    params.append(pytest.param(path.stem, kind, marks=marks, id=path.stem))
  return params


def _is_registered(name: str) -> bool:
  header = json.loads((PARITY / f"{name}.json").read_text())["parity"]
  return parity._find_entry(header["kind"], header["build"]) is not None  # pylint: disable=protected-access


def test_parity_cli_on_shared_fixtures_as_a_subprocess():
  fixtures = _shared_fixtures()
  if not fixtures:
    pytest.skip(f"no parity fixtures under {PARITY}")
  cheap = [p.values[0] for p in fixtures if p.values[1] in ("metric", "block")
           and _is_registered(p.values[0])]
  unregistered = [p.values[0] for p in fixtures if not _is_registered(p.values[0])]
  names = cheap[:1] + unregistered[:1]
  if not names:
    pytest.skip("no cheap registered fixture and no unregistered one to run")
  env = dict(os.environ, PYTHONPATH=str(REPO))
  proc = subprocess.run(
      [sys.executable, "-m", "offseg_jax.tools.parity", "--skip-unregistered"]
      + [str(PARITY / f"{n}.npz") for n in names],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  results = {r["fixture"]: r for r in map(json.loads, proc.stdout.splitlines())}
  assert set(results) == set(names)
  for name in cheap[:1]:
    assert results[name]["pass"] is True
  for name in unregistered[:1]:
    assert results[name]["skipped"] == "not registered"


@pytest.mark.parametrize("name,kind", _shared_fixtures())
def test_parity_on_shared_fixture(name, kind):
  if not _is_registered(name):
    pytest.skip(f"the component of fixture {name} ({kind}) is not registered yet")
  result = parity.check_fixture(PARITY / f"{name}.npz")
  print(json.dumps(result))
  assert result["pass"], result
  header = json.loads((PARITY / f"{name}.json").read_text())["parity"]
  if kind != "metric":
    assert set(header["compare"]) <= set(result["errors"])


# ---------------------------------------------------------------------------
# The complexity tool.
# ---------------------------------------------------------------------------

def _conv(x, w, stride=1, padding=0, groups=1):
  return jax.lax.conv_general_dilated(
      x, w, (stride, stride), ((padding, padding), (padding, padding)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups)


def test_conv_only_count_equals_a_hand_count():
  x = jnp.zeros((2, 32, 30, 3))
  w1 = jnp.zeros((3, 3, 3, 8))         # 3x3 stride 2 pad 1: 16x15 out
  w2 = jnp.zeros((3, 3, 1, 8))         # depthwise
  w3 = jnp.zeros((1, 1, 8, 16))
  w4 = jnp.zeros((5, 5, 16, 16))       # 5x5 pad 2, inside a 3-step scan
  dense = jnp.zeros((16, 10))

  def net(x):
    y = _conv(x, w1, stride=2, padding=1)
    y = _conv(y, w2, padding=1, groups=8)
    y = _conv(y, w3)
    y = jax.lax.scan(lambda c, _: (_conv(c, w4, padding=2), None), y, None, length=3)[0]
    return jax.nn.relu(y) @ dense

  jaxpr = jax.make_jaxpr(net)(x)
  out_pixels = 2 * 16 * 15
  hand_conv = out_pixels * (8 * 3 * 9 + 8 * 1 * 9 + 16 * 8 + 3 * 16 * 16 * 25)
  assert complexity.conv_macs(jaxpr) == hand_conv
  assert complexity.matmul_macs(jaxpr) == hand_conv + out_pixels * 16 * 10


def test_xla_counts_two_flops_per_multiply_add():
  x = jax.ShapeDtypeStruct((1, 16, 16, 8), jnp.float32)
  w = jax.ShapeDtypeStruct((3, 3, 8, 4), jnp.float32)
  hand = 14 * 14 * 4 * 8 * 9                     # VALID: no padded taps
  assert complexity.xla_flops(_conv, x, w) == 2 * hand


def test_param_count_separates_the_unused_conv_seg():
  for classifier, unused in (("conv", 0), ("offset_learning", 8 * 5 + 5)):
    model = _tiny_segmentor(5, classifier)
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3))))
    counts = complexity.param_counts(params["params"])
    total = sum(math.prod(p.shape) for p in jax.tree.leaves(params["params"]))
    assert counts == {"params": total, "unused_conv_seg_params": unused}


def test_complexity_cli_prints_params_and_gflops(capsys):
  argv = ["--model", "test_tools_tiny", "--num-classes", "5", "--size", "40,56"]
  assert complexity.main(argv + ["--json"]) == 0
  result = json.loads(capsys.readouterr().out)
  model = _tiny_segmentor(5)
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 40, 56, 3))))
  assert result["params_M"] * 1e6 == pytest.approx(
      sum(math.prod(p.shape) for p in jax.tree.leaves(params["params"])))
  assert result["input"] == [1, 40, 56, 3]
  assert result["xla_gmacs"] == pytest.approx(result["xla_gflops"] / 2)
  # XLA skips padded taps and adds elementwise ops; same order as the MAC count.
  assert 0.5 < result["xla_gmacs"] / result["matmul_gmacs"] < 2
  assert result["conv_gmacs"] > 0 and result["matmul_gmacs"] >= result["conv_gmacs"]
  assert complexity.main(argv + ["--no-xla"]) == 0
  text = capsys.readouterr().out
  assert "params:" in text and "conv-only" in text and "GMACs" in text
  # An unknown model or a malformed size: one line naming the flag, status 2.
  assert complexity.main(["--model", "test_tools_tiy"]) == 2
  err = capsys.readouterr().err.splitlines()
  assert len(err) == 1 and err[0].startswith(
      "error: flag --model=test_tools_tiy: Unknown model 'test_tools_tiy'. Did you mean ")
  assert "'test_tools_tiny'" in err[0]
  assert complexity.main(argv[:4] + ["--size=40,x"]) == 2
  assert capsys.readouterr().err.splitlines() == [
      "error: flag --size=['40', 'x']: give H,W or one size, positive integers "
      "(e.g. --size=512,1024)"]


def _figures():
  path = PARITY / "figures.json"
  if not path.exists():
    return []
  rows = json.loads(path.read_text())
  return [pytest.param(row, id=row["model"],
                       marks=[] if row["model"] == "offseg_t" else [pytest.mark.slow])
          for row in rows]


@pytest.mark.parametrize("row", _figures())
def test_counts_match_the_published_figures(row):
  if row["model"] not in MODELS:
    pytest.skip(f"{row['model']} is not registered yet")
  figures = row["ade20k_1x3x512x512"]
  result = complexity.analyze(row["model"], 150, (512, 512), compile_xla=False)
  assert result["params_M"] == pytest.approx(row["params_M"], abs=5e-4)
  assert result["conv_gmacs"] == pytest.approx(figures["gmacs_conv_only"], rel=0.03)
  assert result["matmul_gmacs"] == pytest.approx(figures["gmacs_all"], rel=0.03)
  assert result["paper_gflops"] == pytest.approx(figures["paper_gflops"], rel=0.03)


# ---------------------------------------------------------------------------
# The command-line conventions (offseg_jax.cli).
# ---------------------------------------------------------------------------

def _tool_flags(values):
  flags.DEFINE_integer("num_classes", None, "Classes.", flag_values=values)
  flags.DEFINE_bool("xla", True, "Compile.", flag_values=values)
  flags.DEFINE_bool("backbone_only", False, "Backbone.", flag_values=values)
  flags.DEFINE_list("size", ["512"], "H,W.", flag_values=values)


def _parsed(argv):
  seen = {}

  def command(positional, values):
    seen.update(args=cli.positional(positional, 1, 2, usage="tool SRC [DST]"),
                **{name: values[name].value for name in ("num_classes", "xla", "backbone_only",
                                                         "size")})
  return cli.call(_tool_flags, command, argv), seen


def test_flags_take_dashes_or_underscores_and_positionals_anywhere():
  rc, seen = _parsed(["--num-classes", "5", "src", "--no-xla", "--backbone-only",
                      "--size=64,32", "dst"])
  assert rc == 0
  assert seen == {"args": ["src", "dst"], "num_classes": 5, "xla": False,
                  "backbone_only": True, "size": ["64", "32"]}
  rc, seen = _parsed(["--num_classes=7", "--noxla", "--nobackbone-only", "src"])
  assert (rc, seen["num_classes"], seen["xla"], seen["backbone_only"]) == (0, 7, False, False)
  # After "--" everything is positional, dashes and all (launch.local's command).
  rc, seen = _parsed(["--", "--num-classes", "9"])
  assert rc == 0 and seen["args"] == ["--num-classes", "9"] and seen["num_classes"] is None


@pytest.mark.parametrize("argv,line", [
    (["a", "b", "c"], "error: unexpected argument: c (usage: tool SRC [DST])"),
    ([], "error: expected at least 1 argument, got 0 (usage: tool SRC [DST])"),
    (["--num-classes=x", "a"],
     "error: flag --num_classes=x: invalid literal for int() with base 10: 'x'"),
    (["--nmu_classes=3", "a"], "error: Unknown command line flag 'nmu_classes'. Did you mean: "
     "num_classes ?"),
])
def test_bad_command_lines_end_with_one_line_and_status_2(argv, line, capsys):
  assert _parsed(argv)[0] == 2
  captured = capsys.readouterr()
  assert captured.err.splitlines() == [line] and not captured.out


COMMANDS = ["offseg_jax.convert", "offseg_jax.evaluate", "offseg_jax.predict",
            "offseg_jax.tools.complexity", "offseg_jax.tools.complexity_table",
            "offseg_jax.tools.parity", "offseg_jax.tools.benchmark_evaluation",
            "offseg_jax.tools.benchmark_input", "launch.local"]


@pytest.mark.parametrize("module", COMMANDS)
def test_every_command_prints_its_usage_and_flags(module):
  env = dict(os.environ, PYTHONPATH=str(REPO))
  proc = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)
  # absl's --help exits with status 1 after printing the module docstring
  # (which shows the command line) and the command's own flags.
  assert f"python -m {module}" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]
  assert "Try --helpfull" in proc.stdout and "Traceback" not in proc.stderr
  own = proc.stdout.split("flags:", 1)[1]
  assert own.count("\n  --") >= 1
