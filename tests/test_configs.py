"""The official training configs: experiments/configs/{offseg,segformer_ol,segnext_ol}.py.

Every official variant x dataset config loads, is locked-compatible with the
trainer, follows the recipe of the spec (offseg.md §4.1-4.6) and matches its
§4.3 table; only the official combinations exist. No model is compiled.
"""

from __future__ import annotations

import re
from pathlib import Path

from absl import flags
import ml_collections
from ml_collections import config_flags
import pytest

from experiments.configs import default, offseg, official, segformer_ol, segnext_ol
from input_pipeline import datasets
from offseg_jax import optim
from offseg_jax.evaluation import inference
from offseg_jax.registry import MODELS

import offseg_jax.models  # noqa: F401  (registers the models)

REPO = Path(__file__).resolve().parents[1]
FAMILIES = {"offseg.py": offseg, "segformer_ol.py": segformer_ol, "segnext_ol.py": segnext_ol}

# Every official combination, written out independently of the config files.
OFFSEG_ARGS = [f"{v},{d}" for v in "tbl" for d in ("ade20k", "cityscapes", "coco_stuff164k")]
SEGFORMER_ARGS = [f"b{i}{s},{d}" for i in range(6) for s in ("", "_ol")
                  for d in ("ade20k", "coco_stuff164k")]
SEGNEXT_ARGS = [f"{v}{s},{d}" for v in "tsb" for s in ("", "_ol")
                for d in ("ade20k", "cityscapes", "coco_stuff164k", "pascal_context59")]
ALL = ([("offseg.py", a) for a in OFFSEG_ARGS] + [("segformer_ol.py", a) for a in SEGFORMER_ARGS]
       + [("segnext_ol.py", a) for a in SEGNEXT_ARGS])

NUM_CLASSES = {"ade20k": 150, "cityscapes": 19, "coco_stuff164k": 171, "pascal_context59": 59}
CROP = {"ade20k": 512, "coco_stuff164k": 512, "cityscapes": 1024, "pascal_context59": 480}
STRIDE = {"ade20k": 480, "coco_stuff164k": 480, "cityscapes": 768, "pascal_context59": 320}
TRAIN_SCALE = {"ade20k": (2048, 512), "coco_stuff164k": (2048, 512),
               "cityscapes": (2048, 1024), "pascal_context59": (520, 520)}


def _load(file: str, arg: str) -> ml_collections.ConfigDict:
  return FAMILIES[file].get_config(arg)


def _flat_keys(config) -> set[str]:
  keys = set()
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      keys |= {f"{key}.{k}" for k in _flat_keys(value)}
    else:
      keys.add(key)
  return keys


@pytest.mark.parametrize("file,arg", ALL, ids=[f"{f}:{a}" for f, a in ALL])
def test_config_loads_with_required_fields_and_official_recipe(file, arg):
  c = _load(file, arg)
  dataset = arg.split(",")[1]
  for field in ("seed", "batch_size", "total_steps", "eval_every"):
    assert isinstance(c[field], int)
  assert c.model.name in MODELS
  assert c.data.name == dataset and c.data.root
  assert datasets.dataset_info(c.data).num_classes == NUM_CLASSES[dataset]

  # Optimizer and schedule shared by every official config (§4.1-4.2).
  assert (c.optimizer.lr, c.optimizer.weight_decay) == (6e-5, 0.01)
  assert (c.optimizer.b1, c.optimizer.b2, c.optimizer.grad_clip_norm) == (0.9, 0.999, 0.0)
  assert (c.optimizer.warmup_steps, c.optimizer.warmup_start_factor) == (1500, 1e-6)
  assert (c.optimizer.poly_power, c.optimizer.end_lr) == (1.0, 0.0)
  assert c.optimizer.custom_keys.to_dict() == {
      "pos_block": {"decay_mult": 0.0}, "norm": {"decay_mult": 0.0}, "head": {"lr_mult": 10.0}}
  # Durations: official intervals that divide the run; a checkpoint at every eval.
  assert c.eval_every in (8_000, 16_000) and c.total_steps % c.eval_every == 0
  assert c.checkpoint_every == c.eval_every
  # Dataset geometry (§4.4, §4.6): crop, resize scales, slide window.
  assert tuple(c.data.crop_size) == (CROP[dataset],) * 2
  assert tuple(c.data.train_scale) == tuple(c.data.test_scale) == TRAIN_SCALE[dataset]
  assert tuple(c.eval.crop_size) == (CROP[dataset],) * 2
  assert tuple(c.eval.stride) == (STRIDE[dataset],) * 2
  # The evaluator accepts the eval settings.
  settings = inference.InferenceSettings.from_config(c.eval)
  assert settings.mode == c.eval.mode


@pytest.mark.parametrize("file,arg", [("offseg.py", "b,cityscapes"),
                                      ("segformer_ol.py", "b3_ol,coco_stuff164k"),
                                      ("segnext_ol.py", "s,pascal_context59")])
def test_configs_have_exactly_the_trainers_fields(file, arg):
  # default.py is what the trainer tests run end to end: same key tree means
  # every key the trainer reads exists and nothing it ignores was added.
  assert _flat_keys(_load(file, arg)) == _flat_keys(default.get_config())


def test_locked_config_rejects_unknown_keys():
  c = _load("segnext_ol.py", "t_ol,ade20k")
  c.lock()
  c.total_steps = 10                    # known keys stay overridable
  with pytest.raises(AttributeError):
    c.total_step = 10
  with pytest.raises(AttributeError):
    c.eval.windows = 3


def _parse_launch_flags(argv):
  """``--config`` parsed as ``offseg_jax.main`` defines it (locked)."""
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True,
                                  sys_argv=argv)
  fv(argv)
  return fv.config


def test_launch_flag_loads_the_file_with_its_argument_and_locks_it():
  path = REPO / "experiments" / "configs" / "offseg.py"
  config = _parse_launch_flags(["main", f"--config={path}:t,cityscapes",
                                "--config.total_steps=100",
                                "--config.init_from=converted/eformer_s1"])
  assert config.model.name == "offseg_t" and config.data.name == "cityscapes"
  assert config.total_steps == 100 and config.init_from == "converted/eformer_s1"
  with pytest.raises(AttributeError, match="total_stepz"):
    _parse_launch_flags(["main", f"--config={path}:t,cityscapes", "--config.total_stepz=100"])


# ----------------------------------------------------------------------------
# The §4.3 table, row by row for the spot checks the spec calls out.
# ----------------------------------------------------------------------------

def _row(c):
  return (c.model.name, c.total_steps, c.batch_size, tuple(c.data.crop_size), c.eval.mode,
          tuple(c.eval.crop_size), tuple(c.eval.stride), c.eval.size_divisor, c.eval_every)


@pytest.mark.parametrize("file,arg,row", [
    ("offseg.py", "t,ade20k",
     ("offseg_t", 160_000, 16, (512, 512), "slide", (512, 512), (480, 480), 0, 16_000)),
    ("offseg.py", "l,ade20k",
     ("offseg_l", 160_000, 16, (512, 512), "slide", (512, 512), (480, 480), 0, 16_000)),
    ("offseg.py", "t,cityscapes",
     ("offseg_t", 160_000, 8, (1024, 1024), "slide", (1024, 1024), (768, 768), 0, 16_000)),
    ("offseg.py", "b,coco_stuff164k",
     ("offseg_b", 80_000, 16, (512, 512), "slide", (512, 512), (480, 480), 0, 8_000)),
    # Official max_iters 160k with the poly ending at 80k: trained 80k.
    ("offseg.py", "t,coco_stuff164k",
     ("offseg_t", 80_000, 16, (512, 512), "slide", (512, 512), (480, 480), 0, 16_000)),
    ("segformer_ol.py", "b0_ol,ade20k",
     ("segformer_b0_ol", 160_000, 16, (512, 512), "slide", (512, 512), (480, 480), 0, 16_000)),
    ("segformer_ol.py", "b5_ol,coco_stuff164k",
     ("segformer_b5_ol", 80_000, 16, (512, 512), "slide", (512, 512), (480, 480), 0, 8_000)),
    ("segnext_ol.py", "t_ol,ade20k",
     ("segnext_t_ol", 160_000, 16, (512, 512), "whole", (512, 512), (480, 480), 32, 16_000)),
    ("segnext_ol.py", "b_ol,coco_stuff164k",
     ("segnext_b_ol", 80_000, 16, (512, 512), "whole", (512, 512), (480, 480), 32, 16_000)),
    ("segnext_ol.py", "t_ol,pascal_context59",
     ("segnext_t_ol", 80_000, 16, (480, 480), "slide", (480, 480), (320, 320), 32, 8_000)),
    ("segnext_ol.py", "t_ol,cityscapes",
     ("segnext_t_ol", 160_000, 8, (1024, 1024), "slide", (1024, 1024), (768, 768), 32, 16_000)),
    # The official S/B Cityscapes configs use 2 images per GPU.
    ("segnext_ol.py", "s_ol,cityscapes",
     ("segnext_s_ol", 160_000, 16, (1024, 1024), "slide", (1024, 1024), (768, 768), 32, 16_000)),
])
def test_official_table_rows(file, arg, row):
  assert _row(_load(file, arg)) == row


def test_baseline_and_offset_learning_share_the_recipe():
  for file, plain, with_ol in [("segformer_ol.py", "b2,ade20k", "b2_ol,ade20k"),
                               ("segnext_ol.py", "b,cityscapes", "b_ol,cityscapes")]:
    a, b = _load(file, plain).to_dict(), _load(file, with_ol).to_dict()
    assert b["model"]["name"] == a["model"]["name"] + "_ol"
    a.pop("model"), b.pop("model")
    assert a == b


def test_poly_decay_ends_at_the_last_step():
  # COCO-Stuff trains 80k with the decay ending there (not at lr 0 for 80k more).
  c = _load("segnext_ol.py", "t_ol,coco_stuff164k")
  schedule = optim.lr_schedule(c.optimizer.lr, c.total_steps, c.optimizer.warmup_steps,
                               c.optimizer.warmup_start_factor, c.optimizer.poly_power,
                               c.optimizer.end_lr)
  assert float(schedule(1499)) == pytest.approx(6e-5)
  assert float(schedule(40_000)) == pytest.approx(6e-5 * (1 - (40_000 - 1500) / 78_499))
  assert abs(float(schedule(c.total_steps - 1))) < 1e-12


# ----------------------------------------------------------------------------
# Only the official combinations; helpful errors otherwise.
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("file,arg,names", [
    ("offseg.py", "t,pascal_context59", ["ade20k", "cityscapes", "coco_stuff164k"]),
    ("offseg.py", "t_ol,ade20k", ["t, b, l"]),
    ("offseg.py", "s,ade20k", ["t, b, l"]),
    ("segformer_ol.py", "b0_ol,cityscapes", ["ade20k", "coco_stuff164k"]),
    ("segformer_ol.py", "b6_ol,ade20k", ["b0", "b5_ol"]),
    ("segnext_ol.py", "l_ol,ade20k", ["t_ol", "s_ol", "b_ol"]),
    ("segnext_ol.py", "t_ol,ade", ["pascal_context59"]),
    ("segnext_ol.py", "t_ol", ["VARIANT,DATASET"]),
    ("segnext_ol.py", None, ["VARIANT,DATASET"]),
])
def test_unknown_arguments_name_the_valid_choices(file, arg, names):
  with pytest.raises(ValueError) as err:
    _load(file, arg)
  for name in names:
    assert name in str(err.value)


def test_exactly_the_official_combinations_exist():
  candidates = {
      "offseg.py": ["t", "b", "l", "s", "t_ol"],
      "segformer_ol.py": [f"b{i}{s}" for i in range(7) for s in ("", "_ol")],
      "segnext_ol.py": [f"{v}{s}" for v in "tsbl" for s in ("", "_ol")],
  }
  official_args = set(ALL)
  for file, variants in candidates.items():
    for variant in variants:
      for dataset in [*NUM_CLASSES, "bdd100k"]:
        arg = f"{variant},{dataset}"
        if (file, arg) in official_args:
          _load(file, arg)
        else:
          with pytest.raises(ValueError):
            _load(file, arg)


@pytest.mark.parametrize("file", list(FAMILIES))
def test_docstring_launch_command_and_backbone_init_work(file):
  doc = FAMILIES[file].__doc__
  assert "python -m offseg_jax.convert" in doc and "--backbone-only" in doc
  assert "--config.init_from=" in doc
  launch = re.search(r"python -m offseg_jax\.main --config=experiments/configs/([\w.]+):(\S+)",
                     doc)
  assert launch and launch.group(1) == file
  assert _load(file, launch.group(2)).model.name in MODELS
  # The converter is told the model the launched config trains.
  converted = re.search(r"convert --model (\w+)", doc).group(1)
  assert converted == _load(file, launch.group(2)).model.name


def test_global_batch_is_the_per_gpu_batch_on_eight_gpus():
  assert official.Schedule(160_000, 16_000, per_gpu_batch=1).batch_size == 8
  assert official.ITERS_160K.batch_size == 16


@pytest.mark.parametrize("override,expected", [
    ("--config.model.nme=3",
     "error: --config.model.nme=3: unknown config key 'nme' (did you mean 'name'?)"),
    ("--config.batch_sz=4",
     "error: --config.batch_sz=4: unknown config key 'batch_sz' (did you mean 'batch_size'?)"),
    ("--config.optimizer.lr=abc", "could not convert string to float: 'abc'"),
])
def test_command_line_config_errors_are_one_line(override, expected, tmp_path):
  """A bad override ends the command with one line naming it, exit status 2."""
  import subprocess
  import sys
  repo = Path(__file__).resolve().parents[1]
  proc = subprocess.run(
      [sys.executable, "-m", "offseg_jax.main",
       f"--config={repo / 'experiments/configs/default.py'}", f"--workdir={tmp_path}",
       override], capture_output=True, text=True, cwd=repo, timeout=120)
  assert proc.returncode == 2
  lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
  assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
  assert expected in lines[0]
  assert not list(tmp_path.iterdir())      # nothing was started


# Every command that takes --config, with the other flags it requires.
CONFIG_COMMANDS = [
    ("offseg_jax.evaluate", ["--checkpoint=/nonexistent"]),
    ("offseg_jax.predict", ["--checkpoint=/nonexistent", "--input=/x", "--output=/x"]),
    ("offseg_jax.tools.benchmark", []),
    ("offseg_jax.tools.profile", []),
    ("offseg_jax.tools.aot", []),
    ("offseg_jax.tools.ablation", []),
    ("offseg_jax.tools.benchmark_input", []),
    ("input_pipeline.pack", ["--output=/x"]),
    ("input_pipeline.check", []),
]


def test_every_command_names_an_unknown_config_key_in_one_line():
  import subprocess
  import sys
  repo = Path(__file__).resolve().parents[1]
  for module, extra in CONFIG_COMMANDS:
    proc = subprocess.run(
        [sys.executable, "-m", module, "--config=experiments/configs/default.py",
         "--config.data.nme=1", *extra], capture_output=True, text=True, cwd=repo, timeout=120)
    lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
    assert proc.returncode == 2 and lines == [
        "error: --config.data.nme=1: unknown config key 'nme' (did you mean 'name'?)"], (
            module, proc.stderr[-2000:])
