"""Reading torch checkpoints without torch, the convert CLI and converted checkpoints.

Torch-format files are generated here by a minimal writer (zip + protocol-2
pickle with persistent storage ids, the layout ``torch.save`` produces), so
none of this needs torch; a real ``torch.save`` round trip runs when torch is
installed.
"""

from __future__ import annotations

import collections
import io
import json
import os
import pickle
import zipfile
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from offseg_jax import convert
from offseg_jax.conversion import core, torch_pickle, variables_io
from offseg_jax.models import layers, segmentor
from offseg_jax.registry import MODELS

REPO = Path(__file__).resolve().parents[1]
PARITY = Path(os.environ.get("OFFSEG_SHARED", REPO.parent / "shared")) / "parity"


# ---------------------------------------------------------------------------
# A torch-free writer of torch's zip checkpoint format.
# ---------------------------------------------------------------------------

_STORAGE_NAMES = {
    np.dtype(np.float32): "FloatStorage", np.dtype(np.float64): "DoubleStorage",
    np.dtype(np.float16): "HalfStorage", np.dtype(ml_dtypes.bfloat16): "BFloat16Storage",
    np.dtype(np.int64): "LongStorage", np.dtype(np.int32): "IntStorage",
    np.dtype(np.uint8): "ByteStorage", np.dtype(np.bool_): "BoolStorage",
}


class Global:
  """Pickled as ``GLOBAL module name``; the module need not be importable."""

  def __init__(self, module: str, name: str):
    self.module, self.name = module, name

  def __call__(self, *args):  # pickle's save_reduce insists on a callable
    raise TypeError("a stand-in, never called")


class View:
  """A tensor viewing ``base``'s storage with explicit offset/shape/stride."""

  def __init__(self, base: np.ndarray, offset: int, shape, stride):
    self.base, self.offset, self.shape, self.stride = base, offset, shape, stride


class Param:
  """An ``nn.Parameter`` (pickled through ``_rebuild_parameter``)."""

  def __init__(self, array: np.ndarray):
    self.array = array


class Call:
  """``module.name(*args)`` in the pickle: an arbitrary (foreign) object."""

  def __init__(self, module: str, name: str, *args):
    self.func, self.args = Global(module, name), args

  def __reduce__(self):
    return self.func, self.args


class _Storage:

  def __init__(self, key: str, flat: np.ndarray):
    self.key, self.flat = key, flat


class _Tensor:

  def __init__(self, storage, offset, shape, stride):
    self.storage, self.offset, self.shape, self.stride = storage, offset, shape, stride

  def __reduce__(self):
    return (Global("torch._utils", "_rebuild_tensor_v2"),
            (self.storage, self.offset, tuple(self.shape), tuple(self.stride), False,
             collections.OrderedDict()))


class _Parameter:

  def __init__(self, tensor):
    self.tensor = tensor

  def __reduce__(self):
    return (Global("torch._utils", "_rebuild_parameter"),
            (self.tensor, True, collections.OrderedDict()))


class _Pickler(pickle._Pickler):  # the pure-Python pickler lets us emit raw GLOBALs

  def persistent_id(self, obj):
    if isinstance(obj, _Storage):
      return ("storage", Global("torch", _STORAGE_NAMES[obj.flat.dtype]), obj.key, "cpu",
              obj.flat.size)
    return None

  def save(self, obj, save_persistent_id=True):
    if isinstance(obj, Global):
      self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
      return
    super().save(obj, save_persistent_id)


def write_torch_file(path, obj, root: str = "archive") -> None:
  """Writes ``obj`` (numpy arrays = tensors) in torch's zip checkpoint format."""
  storages: dict[int, _Storage] = {}

  def storage_of(base: np.ndarray) -> _Storage:
    if id(base) not in storages:
      storages[id(base)] = _Storage(str(len(storages)), np.ascontiguousarray(base).reshape(-1))
    return storages[id(base)]

  def tensor(a: np.ndarray) -> _Tensor:
    strides = [int(np.prod(a.shape[i + 1:])) for i in range(a.ndim)]   # row-major
    return _Tensor(storage_of(a), 0, a.shape, strides)

  def convert_tree(o):
    if isinstance(o, np.ndarray):
      return tensor(o)
    if isinstance(o, View):
      return _Tensor(storage_of(o.base), o.offset, o.shape, o.stride)
    if isinstance(o, Param):
      return _Parameter(tensor(o.array))
    if isinstance(o, collections.OrderedDict):
      return collections.OrderedDict((k, convert_tree(v)) for k, v in o.items())
    if isinstance(o, dict):
      return {k: convert_tree(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
      return type(o)(convert_tree(v) for v in o)
    return o

  buf = io.BytesIO()
  _Pickler(buf, protocol=2).dump(convert_tree(obj))
  with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
    zf.writestr(f"{root}/data.pkl", buf.getvalue())
    zf.writestr(f"{root}/byteorder", "little")
    for s in storages.values():
      zf.writestr(f"{root}/data/{s.key}", s.flat.astype(s.flat.dtype.newbyteorder("<")).tobytes())
    zf.writestr(f"{root}/version", "3\n")


# ---------------------------------------------------------------------------
# A tiny model with the features conversion must handle (dotted names, BN, GN).
# ---------------------------------------------------------------------------

TINY = "test_conversion_tiny"


class TinyBackbone(nn.Module):
  widths: tuple = (8, 16)

  @nn.compact
  def __call__(self, x, train: bool = False):
    outs = []
    for i, w in enumerate(self.widths):
      x = layers.ConvModule(w, 3, 2, 1, norm="bn", name=f"stages.{i}")(x, train)
      outs.append(x)
    return tuple(outs)


class TinyHead(nn.Module):
  num_classes: int
  channels: int = 8

  @nn.compact
  def __call__(self, feats, train: bool = False):
    x = layers.ConvModule(self.channels, 1, norm="gn", num_groups=4, name="squeeze")(
        layers.resize_bilinear(feats[-1], feats[0].shape[1:3]), train)
    x = x + layers.Linear(self.channels, name="proj.0")(feats[0])
    return layers.Conv2d(self.num_classes, 1, name="conv_seg")(x), {}


def tiny_from_official(cfg, num_classes):
  cfg = cfg.get("model", cfg)
  return segmentor.EncoderDecoder(
      backbone=TinyBackbone(tuple(cfg["backbone"]["widths"])),
      decode_head=TinyHead(num_classes, cfg["decode_head"]["channels"]))


if TINY not in MODELS:
  @MODELS.register(TINY, from_official=tiny_from_official,
                   torch_ignore=(r"^backbone\..*\.bn\.unused_buffer$",))
  def _tiny(num_classes: int):
    return segmentor.EncoderDecoder(backbone=TinyBackbone(), decode_head=TinyHead(num_classes))


IMAGES = np.random.default_rng(0).standard_normal((2, 24, 32, 3)).astype(np.float32)


def random_variables(model, seed: int = 0):
  """Variables with every value random (variances positive), as numpy."""
  template = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), IMAGES)
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map_with_path(
      lambda p, s: (rng.uniform(0.5, 2.0, s.shape) if p[-1].key == "var"
                    else rng.standard_normal(s.shape)).astype(np.float32), template)


def official_state(variables) -> collections.OrderedDict:
  """The torch state dict an official checkpoint of the tiny model would hold."""
  state = collections.OrderedDict(core.flax_to_torch(variables))
  for key in [k for k in state if k.endswith(".running_var")]:
    base = key[: -len("running_var")]
    state[base + "num_batches_tracked"] = np.array(0, np.int64)
    state[base + "unused_buffer"] = np.zeros(3, np.float32)   # matched by torch_ignore
  return state


def forward(model, variables):
  return np.asarray(jax.jit(model.apply)(variables, IMAGES)[0])


def backbone_features(model):
  """A jitted ``variables -> backbone features`` function."""
  return jax.jit(lambda v: model.apply(v, IMAGES, method=lambda m, x: m.backbone(x)))


# ---------------------------------------------------------------------------
# Reading torch checkpoints.
# ---------------------------------------------------------------------------

def test_reader_honours_dtypes_strides_offsets_prefix_and_meta(tmp_path):
  rng = np.random.default_rng(1)
  base = np.arange(24, dtype=np.float32)
  weight = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
  half = rng.standard_normal((2, 5)).astype(np.float16)
  bf16 = rng.standard_normal(7).astype(ml_dtypes.bfloat16)
  state = collections.OrderedDict([
      ("module.conv.weight", Param(weight)),
      ("module.bn.num_batches_tracked", np.array(5, np.int64)),
      ("module.idx", np.arange(6, dtype=np.int64).reshape(2, 3)),
      ("module.half", half),
      ("module.bf16", bf16),
      ("module.mask", np.array([True, False, True])),
      # views of one shared storage: a transpose and an offset slice with strides
      ("module.transposed", View(base, 0, (6, 4), (1, 6))),
      ("module.sliced", View(base, 7, (2, 3), (6, 2))),
  ])
  meta = {"cfg": "model = dict(type='EncoderDecoder')", "classes": ("a", "b"),
          "hub": Call("mmengine.logging.message_hub", "MessageHub", "x", 3)}
  path = tmp_path / "ckpt.pth"
  write_torch_file(path, {"meta": meta, "state_dict": state, "message_hub": Call("a.b", "C")})

  ckpt = torch_pickle.read_checkpoint(path)
  sd = ckpt.state_dict
  assert ckpt.source_key == "state_dict"
  assert list(sd) == ["conv.weight", "bn.num_batches_tracked", "idx", "half", "bf16", "mask",
                      "transposed", "sliced"]
  np.testing.assert_array_equal(sd["conv.weight"], weight)
  assert sd["bn.num_batches_tracked"].shape == () and sd["bn.num_batches_tracked"] == 5
  assert sd["idx"].dtype == np.int64
  np.testing.assert_array_equal(sd["idx"], np.arange(6).reshape(2, 3))
  assert sd["half"].dtype == np.float16 and np.array_equal(sd["half"], half)
  assert sd["bf16"].dtype == ml_dtypes.bfloat16 and np.array_equal(sd["bf16"], bf16)
  np.testing.assert_array_equal(sd["mask"], [True, False, True])
  np.testing.assert_array_equal(sd["transposed"], base.reshape(4, 6).T)
  np.testing.assert_array_equal(sd["sliced"], base.reshape(4, 6)[1:3, 1::2])
  assert sd["transposed"].flags.c_contiguous and sd["transposed"].flags.writeable
  assert ckpt.meta["cfg"] == "model = dict(type='EncoderDecoder')"
  assert ckpt.meta["classes"] == ("a", "b")
  hub = ckpt.meta["hub"]
  assert isinstance(hub, torch_pickle.OpaqueObject) and hub.args == ("x", 3)
  assert ckpt.opaque_classes == ["a.b.C", "mmengine.logging.message_hub.MessageHub"]


@pytest.mark.parametrize("layout", ["model", "bare", "state_dict"])
def test_reader_finds_the_weights_of_each_checkpoint_layout(tmp_path, layout):
  weights = {"patch_embed.0.weight": np.ones((2, 3, 3, 3), np.float32),
             "head.weight": np.zeros((5, 2), np.float32)}
  obj = {"bare": weights, "model": {"model": weights, "epoch": 3},
         "state_dict": {"state_dict": weights, "meta": {"iter": 5}}}[layout]
  write_torch_file(tmp_path / "w.pth", obj)
  state, meta = torch_pickle.load_state_dict(tmp_path / "w.pth")
  assert sorted(state) == sorted(weights)
  assert meta == ({"iter": 5} if layout == "state_dict" else None)


def test_reader_never_runs_code_from_the_file(tmp_path):
  marker = tmp_path / "pwned"
  write_torch_file(tmp_path / "evil.pth", {
      "state_dict": {"w": np.ones(2, np.float32)},
      "meta": {"x": Call("os", "system", f"touch {marker}"),
               "y": Call("builtins", "eval", "1+1")}})
  ckpt = torch_pickle.read_checkpoint(tmp_path / "evil.pth")
  assert not marker.exists()
  assert isinstance(ckpt.meta["x"], torch_pickle.OpaqueObject)
  assert isinstance(ckpt.meta["y"], torch_pickle.OpaqueObject)
  assert "os.system" in ckpt.opaque_classes


def test_corrupt_truncated_or_foreign_files_name_the_file(tmp_path):
  good = tmp_path / "good.pth"
  write_torch_file(good, {"state_dict": {"w": np.ones((64, 64), np.float32)}})
  data = good.read_bytes()
  truncated = tmp_path / "truncated.pth"
  truncated.write_bytes(data[: len(data) // 2])
  garbage = tmp_path / "garbage.pth"
  garbage.write_bytes(b"this is not a checkpoint")
  # A storage record shorter than its tensor needs.
  short = tmp_path / "short.pth"
  with zipfile.ZipFile(good) as src, zipfile.ZipFile(short, "w") as dst:
    for name in src.namelist():
      dst.writestr(name, src.read(name)[:100] if name.endswith("data/0") else src.read(name))
  for path in (truncated, garbage, short, tmp_path / "absent.pth"):
    with pytest.raises(torch_pickle.CheckpointReadError, match=str(path.name)):
      torch_pickle.read_checkpoint(path)


def test_legacy_format_without_torch_is_a_clear_error(tmp_path, monkeypatch):
  legacy = tmp_path / "legacy.pth"
  legacy.write_bytes(pickle.dumps({"w": [1, 2]}, protocol=2))   # non-zip: torch < 1.6 layout
  monkeypatch.setitem(__import__("sys").modules, "torch", None)  # as if torch were absent
  with pytest.raises(torch_pickle.CheckpointReadError, match="legacy.pth.*needs torch"):
    torch_pickle.read_checkpoint(legacy)


def test_real_torch_save_round_trip(tmp_path):
  torch = pytest.importorskip("torch")
  conv = torch.nn.Conv2d(3, 4, 3)
  bn = torch.nn.BatchNorm2d(4)
  state = collections.OrderedDict(
      [("conv." + k, v) for k, v in conv.state_dict().items()]
      + [("bn." + k, v) for k, v in bn.state_dict().items()])
  base = torch.arange(24.0).reshape(4, 6)
  state["t"] = base.t()
  state["s"] = base[1:3, ::2]
  state["bf"] = torch.randn(5).bfloat16()
  state["h"] = torch.randn(3).half()
  torch.save({"state_dict": state, "meta": {"cfg": "a = 1"}}, tmp_path / "real.pth")
  ckpt = torch_pickle.read_checkpoint(tmp_path / "real.pth")
  assert list(ckpt.state_dict) == list(state)
  for k, v in state.items():
    ours = ckpt.state_dict[k]
    assert ours.shape == tuple(v.shape), k
    np.testing.assert_array_equal(ours.astype(np.float64), v.double().numpy(), err_msg=k)
  assert ckpt.state_dict["bf"].dtype == ml_dtypes.bfloat16
  assert ckpt.meta == {"cfg": "a = 1"}
  # The legacy (non-zip) format goes through torch.
  torch.save(state, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
  legacy = torch_pickle.read_checkpoint(tmp_path / "legacy.pth").state_dict
  np.testing.assert_array_equal(legacy["t"], state["t"].numpy())


# ---------------------------------------------------------------------------
# The official config inside a checkpoint's meta.
# ---------------------------------------------------------------------------

def test_config_text_is_evaluated_without_running_it():
  text = (
      "norm_cfg = dict(type='SyncBN', requires_grad=True)\n"
      "crop_size = (512, 512)\n"
      "model = dict(\n"
      "    type='EncoderDecoder',\n"
      "    backbone=dict(type='X', widths=[8, 16], eps=-1e-6, **dict(depth=2)),\n"
      "    decode_head=dict(num_classes=150 - 1, norm_cfg=norm_cfg, size=crop_size))\n"
      "evil = __import__('os').system('echo no')\n"
      "train_pipeline = [dict(type='Resize', scale=crop_size, keep_ratio=True)]\n")
  env = convert.parse_config_text(text)
  assert "evil" not in env
  assert env["model"] == {
      "type": "EncoderDecoder",
      "backbone": {"type": "X", "widths": [8, 16], "eps": -1e-6, "depth": 2},
      "decode_head": {"num_classes": 149, "norm_cfg": {"type": "SyncBN", "requires_grad": True},
                      "size": (512, 512)}}
  assert convert.official_model_config({"cfg": text})["type"] == "EncoderDecoder"
  assert convert.official_model_config({"config": {"model": {"a": 1}}}) == {"a": 1}
  assert convert.official_model_config({"iter": 3}) is None


# ---------------------------------------------------------------------------
# The convert CLI on generated checkpoints.
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
  model = MODELS.build(TINY, num_classes=5)
  variables = random_variables(model)
  path = tmp_path_factory.mktemp("ckpt") / "tiny.pth"
  write_torch_file(path, {"state_dict": official_state(variables), "meta": {"iter": 10}})
  return model, variables, path


def test_convert_cli_round_trip_gives_identical_outputs(tiny_checkpoint, tmp_path, capsys):
  model, variables, path = tiny_checkpoint
  out = tmp_path / "converted"
  assert convert.main(["--model", TINY, "--num-classes", "5", str(path), str(out)]) == 0
  assert variables_io.is_converted_checkpoint(out)
  meta = variables_io.load_meta(out)
  assert meta["model"] == TINY and meta["num_classes"] == 5 and not meta["backbone_only"]
  assert meta["report"]["missing"] == [] and meta["report"]["unexpected"] == []
  assert "backbone.stages.0.bn.num_batches_tracked" in meta["report"]["ignored"]
  assert "backbone.stages.1.bn.unused_buffer" in meta["report"]["ignored"]
  template = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), IMAGES)
  loaded = variables_io.load_variables(out, target=template)
  np.testing.assert_array_equal(forward(model, loaded), forward(model, variables))
  # Without a target the stored tree comes back as is.
  plain = variables_io.load_variables(out / "variables")
  assert jax.tree.structure(plain) == jax.tree.structure(variables)
  # An existing checkpoint is only replaced on request.
  assert convert.main(["--model", TINY, "--num-classes", "5", str(path), str(out)]) == 1
  assert "--force" in capsys.readouterr().err


def test_convert_positional_count_is_a_one_line_usage_error(capsys):
  assert convert.main(["--model", TINY, "only_src.pth"]) == 2
  assert capsys.readouterr().err.splitlines() == [
      f"error: expected 2 arguments, got 1 (usage: {convert.USAGE})"]


def test_convert_names_missing_and_unexpected_keys(tiny_checkpoint, tmp_path, capsys):
  _, variables, _ = tiny_checkpoint
  state = official_state(variables)
  del state["decode_head.squeeze.gn.bias"]
  state["decode_head.extra.weight"] = np.ones(3, np.float32)
  write_torch_file(tmp_path / "bad.pth", {"state_dict": state})
  rc = convert.main(["--model", TINY, "--num-classes", "5", str(tmp_path / "bad.pth"),
                     str(tmp_path / "out")])
  captured = capsys.readouterr()
  assert rc == 1
  assert "decode_head.squeeze.gn.bias" in captured.out
  assert "decode_head.extra.weight" in captured.out
  assert "missing" in captured.err and "not used" in captured.err
  assert not variables_io.is_converted_checkpoint(tmp_path / "out")
  # Unexpected keys alone can be dropped on request; missing ones never.
  state["decode_head.squeeze.gn.bias"] = np.zeros(8, np.float32)
  write_torch_file(tmp_path / "extra.pth", {"state_dict": state})
  assert convert.main(["--model", TINY, "--num-classes", "5", "--allow-unexpected",
                       str(tmp_path / "extra.pth"), str(tmp_path / "out")]) == 0
  assert variables_io.load_meta(tmp_path / "out")["report"]["unexpected"] == [
      "decode_head.extra.weight"]


def test_convert_refuses_shape_mismatches(tiny_checkpoint, tmp_path, capsys):
  _, variables, _ = tiny_checkpoint
  state = official_state(variables)
  state["decode_head.conv_seg.weight"] = np.ones((7, 8, 1, 1), np.float32)   # 7 classes
  write_torch_file(tmp_path / "k7.pth", {"state_dict": state})
  rc = convert.main(["--model", TINY, "--num-classes", "5", str(tmp_path / "k7.pth"),
                     str(tmp_path / "out")])
  err = capsys.readouterr().err
  assert rc == 1
  assert "decode_head.conv_seg.weight" in err and "(1, 1, 8, 7)" in err


def test_convert_builds_the_model_from_the_config_in_meta(tmp_path):
  cfg = {"type": "EncoderDecoder", "backbone": {"widths": [4, 8]},
         "decode_head": {"channels": 4, "num_classes": 3}}
  model = tiny_from_official(cfg, 3)
  variables = random_variables(model, seed=3)
  write_torch_file(tmp_path / "m.pth", {"state_dict": official_state(variables),
                                        "meta": {"cfg": f"model = {cfg!r}\n"}})
  meta = convert.convert_checkpoint(str(tmp_path / "m.pth"), str(tmp_path / "out"),
                                    model_name=TINY, log=lambda s: None)
  assert meta["num_classes"] == 3 and meta["official_config"] == cfg
  loaded = variables_io.load_variables(tmp_path / "out")
  np.testing.assert_array_equal(forward(model, loaded), forward(model, variables))
  # Built by name instead, the registry default (widths 8/16) does not fit.
  with pytest.raises(convert.ConvertError, match="Shape mismatch"):
    convert.convert_checkpoint(str(tmp_path / "m.pth"), str(tmp_path / "out2"),
                               model_name=TINY, num_classes=3, use_meta=False,
                               log=lambda s: None)


def test_backbone_only_checkpoint_merges_into_fresh_variables(tiny_checkpoint, tmp_path, capsys):
  model, variables, _ = tiny_checkpoint
  # ImageNet layout: no 'backbone.' prefix, plus classifier keys to ignore.
  state = collections.OrderedDict(
      (k[len("backbone."):], v) for k, v in official_state(variables).items()
      if k.startswith("backbone."))
  state["head.weight"] = np.ones((10, 16), np.float32)
  state["dist_head.bias"] = np.ones(10, np.float32)
  state["norm.weight"] = np.ones(16, np.float32)
  write_torch_file(tmp_path / "imagenet.pth", {"model": state})
  out = tmp_path / "bb"
  assert convert.main(["--model", TINY, "--backbone-only", str(tmp_path / "imagenet.pth"),
                       str(out)]) == 0
  assert "missing" not in capsys.readouterr().out
  meta = variables_io.load_meta(out)
  assert meta["backbone_only"] and meta["num_classes"] is None
  assert {"backbone.head.weight", "backbone.norm.weight"} <= set(meta["report"]["ignored"])
  partial = variables_io.load_variables(out)
  assert set(partial) == {"params", "batch_stats"}
  assert set(partial["params"]) == {"backbone"}

  fresh = jax.tree.map(jnp.asarray, random_variables(model, seed=7))
  merged, report = variables_io.merge_into(fresh, partial)
  assert report.replaced and all(p.split("/")[1] == "backbone" for p in report.replaced)
  assert report.kept and all(p.split("/")[1] == "decode_head" for p in report.kept)
  # (the tiny head has no BatchNorm: all of batch_stats is the backbone's)
  assert report.replaced_subtrees == ["batch_stats", "params/backbone"]
  assert str(report).startswith(f"{len(report.replaced)} arrays replaced "
                                "(batch_stats, params/backbone)")
  # Leaves absent from the checkpoint stay as they were.
  del partial["params"]["backbone"]["stages.1"]["bn"]["bias"]
  _, report = variables_io.merge_into(fresh, partial)
  assert "params/backbone/stages.1/bn/bias" in report.kept
  assert report.replaced_subtrees == [
      "batch_stats", "params/backbone/stages.0", "params/backbone/stages.1/bn/scale",
      "params/backbone/stages.1/conv"]
  assert isinstance(merged["params"]["backbone"]["stages.0"]["conv"]["kernel"], jax.Array)
  np.testing.assert_array_equal(merged["params"]["backbone"]["stages.1"]["bn"]["scale"],
                                variables["params"]["backbone"]["stages.1"]["bn"]["scale"])
  np.testing.assert_array_equal(merged["params"]["decode_head"]["conv_seg"]["kernel"],
                                fresh["params"]["decode_head"]["conv_seg"]["kernel"])
  features = backbone_features(model)
  for ours, ref in zip(features(merged), features(jax.tree.map(jnp.asarray, variables))):
    np.testing.assert_array_equal(ours, ref)

  bad = {"params": {"backbone": {"stages.0": {"conv": {"kernel": np.ones((3, 3, 3, 9))}}},
                    "nothere": {"w": np.ones(2)}}}
  with pytest.raises(variables_io.CheckpointMismatchError,
                     match=r"(?s)nothere/w.*params/backbone/stages.0/conv/kernel"):
    variables_io.merge_into(fresh, bad)


def test_load_variables_names_structure_and_shape_mismatches(tiny_checkpoint, tmp_path):
  model, variables, path = tiny_checkpoint
  out = tmp_path / "c"
  convert.convert_checkpoint(str(path), str(out), model_name=TINY, num_classes=5,
                             log=lambda s: None)
  other = MODELS.build(TINY, num_classes=6)
  target = jax.eval_shape(lambda x: other.init(jax.random.key(0), x), IMAGES)
  with pytest.raises(variables_io.CheckpointMismatchError,
                     match=r"params/decode_head/conv_seg/bias stored \(5,\) expected \(6,\)"):
    variables_io.load_variables(out, target=target)
  target = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), IMAGES)
  del target["batch_stats"]
  with pytest.raises(variables_io.CheckpointMismatchError, match="batch_stats/backbone"):
    variables_io.load_variables(out, target=target)
  with pytest.raises(FileNotFoundError, match="not a converted checkpoint"):
    variables_io.load_variables(tmp_path)


# ---------------------------------------------------------------------------
# Real key sets: the parity fixtures' weights as official checkpoints.
# ---------------------------------------------------------------------------

def _fixture_state(name):
  with np.load(PARITY / f"{name}.npz") as data:
    return collections.OrderedDict(
        (k[len("state/"):], data[k].reshape(()) if k.endswith("num_batches_tracked") else data[k])
        for k in data.files if k.startswith("state/"))


@pytest.mark.parametrize("name", [
    "offseg_t",
    pytest.param("segformer_b0_ol", marks=pytest.mark.slow),
    pytest.param("segnext_t_ol", marks=pytest.mark.slow)])
def test_official_key_sets_convert_completely(name, tmp_path):
  if not (PARITY / f"{name}.json").exists():
    pytest.skip(f"fixture {name} not found under {PARITY}")
  header = json.loads((PARITY / f"{name}.json").read_text())["parity"]
  if header["build"] not in MODELS:
    pytest.skip(f"model {header['build']} is not registered yet")
  state = _fixture_state(name)
  config_text = f"model = {header['official_config']!r}\n"
  write_torch_file(tmp_path / "full.pth", {"state_dict": state, "meta": {"cfg": config_text}})
  meta = convert.convert_checkpoint(str(tmp_path / "full.pth"), str(tmp_path / "full"),
                                    model_name=header["build"], log=lambda s: None)
  assert meta["num_classes"] == header["num_classes"]
  assert meta["report"]["missing"] == [] and meta["report"]["unexpected"] == []
  stored = variables_io.stored_shapes(tmp_path / "full")
  assert meta["report"]["num_arrays"] == len(stored)
  # Every official key was used or deliberately ignored.
  assert len(stored) == len(state) - len(meta["report"]["ignored"])

  backbone = collections.OrderedDict(
      (k[len("backbone."):], v) for k, v in state.items() if k.startswith("backbone."))
  backbone["head.weight"] = np.zeros((1000, 8), np.float32)
  write_torch_file(tmp_path / "bb.pth", {"model": backbone})
  meta = convert.convert_checkpoint(str(tmp_path / "bb.pth"), str(tmp_path / "bb"),
                                    model_name=header["build"], backbone_only=True,
                                    log=lambda s: None)
  assert meta["report"]["missing"] == [] and meta["report"]["unexpected"] == []
  assert all(k.split("/")[1] == "backbone" for k in variables_io.stored_shapes(tmp_path / "bb"))


@pytest.mark.slow
def test_converted_fixture_checkpoint_reproduces_official_logits(tmp_path):
  """Torch-format file -> convert CLI -> load_variables -> forward == official logits."""
  name = "segformer_b0_ol"
  if not (PARITY / f"{name}.json").exists():
    pytest.skip(f"fixture {name} not found under {PARITY}")
  header = json.loads((PARITY / f"{name}.json").read_text())["parity"]
  if header["build"] not in MODELS:
    pytest.skip(f"model {header['build']} is not registered yet")
  write_torch_file(tmp_path / "official.pth", {
      "state_dict": _fixture_state(name),
      "meta": {"cfg": f"model = {header['official_config']!r}\n"}})
  assert convert.main(["--model", header["build"], str(tmp_path / "official.pth"),
                       str(tmp_path / "out")]) == 0
  meta = variables_io.load_meta(tmp_path / "out")
  model = MODELS.get(meta["model"]).from_official(meta["official_config"], meta["num_classes"])
  with np.load(PARITY / f"{name}.npz") as data:
    images, ref = data["input"].transpose(0, 2, 3, 1), data["logits"]
  template = jax.eval_shape(lambda: model.init(jax.random.key(0), images))
  variables = variables_io.load_variables(tmp_path / "out", target=template)
  with jax.default_matmul_precision("highest"):
    logits, _ = jax.jit(model.apply)(variables, images)
  err = np.abs(np.asarray(logits).transpose(0, 3, 1, 2) - ref).max()
  assert err <= header["compare"]["logits"], err
