"""Dataset evaluation (sharding, prediction scoring) and the evaluate / predict /
benchmark tools on a tiny checkpoint."""

import functools
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image

from input_pipeline import datasets
from offseg_jax import metric_log
from offseg_jax.evaluation import report, runner

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(mode="whole", num_val=5):
  from experiments.configs import common  # pylint: disable=g-import-not-at-top
  c = common.base_config()
  c.total_steps = 10
  c.model = ml_collections.ConfigDict({"name": "tiny", "widths": (8, 8, 16, 16), "channels": 16})
  c.data = common.data_config("synthetic", num_train=8, num_val=num_val, image_size=64,
                              crop_size=(64, 64))
  c.eval.mode = mode
  c.eval.crop_size = (32, 32)
  c.eval.stride = (24, 24)
  c.eval.batch_size = 4
  c.eval.metrics = ("mIoU", "mDice")
  return c


class PixelModel:
  """Per-pixel linear classifier: cheap to compile, deterministic."""

  def apply(self, variables, images, train=False, rngs=None):
    return images @ variables["w"], {}


def pixel_variables(num_classes):
  return {"w": jnp.asarray(np.random.default_rng(0).normal(size=(3, num_classes)), jnp.float32)}


def labelled_pixels(config):
  source = datasets.build_source(config.data, "val")
  return sum(int((np.asarray(source[i]["label"]) != 255).sum()) for i in range(len(source)))


def test_every_image_is_counted_once_with_one_and_two_processes():
  config = tiny_config()
  variables = pixel_variables(datasets.dataset_info(config.data).num_classes)
  seen = []
  summary, full = runner.evaluate_model(PixelModel(), variables, config, progress=False,
                                        callback=lambda ex, pred: seen.append(ex["name"]))
  parts = []
  for p in range(2):
    _, part = runner.evaluate_model(PixelModel(), variables, config, progress=False,
                                    shard=(p, 2),
                                    callback=lambda ex, pred: seen.append(ex["name"]))
    parts.append(part)
  assert full.dtype == np.int64
  assert full.sum() == labelled_pixels(config)
  np.testing.assert_array_equal(parts[0] + parts[1], full)
  assert parts[0].sum() > 0 and parts[1].sum() > 0
  # One process saw every image once; the two shards together saw each once more.
  assert sorted(seen[:5]) == sorted(set(seen)) and sorted(seen[5:]) == sorted(seen[:5])
  assert set(summary) >= {"aAcc", "mIoU", "mAcc", "mDice", "per_class"}


def test_scored_prediction_pngs_give_the_same_confusion(tmp_path):
  config = tiny_config(num_val=3)
  info = datasets.dataset_info(config.data)
  written = []

  def save(example, pred):
    Image.fromarray(pred.astype(np.uint8)).save(tmp_path / f"{example['name']}.png")
    written.append(example["name"])

  _, confusion = runner.evaluate_model(PixelModel(), pixel_variables(info.num_classes), config,
                                       progress=False, callback=save)
  _, scored = runner.score_predictions(tmp_path, config, progress=False)
  np.testing.assert_array_equal(scored, confusion)
  os.remove(tmp_path / f"{written[1]}.png")
  with pytest.raises(FileNotFoundError, match=written[1]):
    runner.score_predictions(tmp_path, config, progress=False)


def test_reduce_zero_label_predictions_are_shifted_back():
  raw = np.array([[1, 2], [150, 3]])
  np.testing.assert_array_equal(
      runner.labels_from_dataset_convention(raw, True, 150, "x.png"), [[0, 1], [149, 2]])
  np.testing.assert_array_equal(runner.labels_from_dataset_convention(raw, False, 151), raw)
  with pytest.raises(ValueError, match="x.png"):
    runner.labels_from_dataset_convention(np.array([[0, 1]]), True, 150, "x.png")


def test_scalars_are_written_once_and_read_back_as_json_lines(tmp_path):
  log = metric_log.MetricLog(tmp_path)
  for step in (10, 20, 30):
    log.scalars(step, {"loss": 1.0 / step}, "train/")
  log.scalars(30, {"mIoU": 42.5}, "val/")
  log.scalars(40, {"loss": float("nan")}, "train/")
  log.close()
  lines = (tmp_path / "scalars.jsonl").read_text().splitlines()
  assert [json.loads(line)["step"] for line in lines] == [10, 20, 30, 40]   # one line a step
  assert json.loads(lines[-1]) == {"step": 40, "train/loss": None}           # strict JSON
  assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))      # and TensorBoard
  scalars = metric_log.read_scalars(tmp_path)
  assert scalars["train/loss"] == [(10, pytest.approx(0.1)), (20, pytest.approx(0.05)),
                                   (30, pytest.approx(1 / 30))]
  assert scalars["val/mIoU"] == [(30, pytest.approx(42.5))]
  path = report.plot_training_curves(scalars, tmp_path / "curves.png")
  assert len(path.read_bytes()) > 0          # an epath.Path (local or gs://)


def test_a_resumed_run_keeps_one_curve(tmp_path):
  log = metric_log.MetricLog(tmp_path)
  for step in (1, 2, 3, 4):                  # killed after logging step 4; last checkpoint 2
    log.scalars(step, {"loss": float(step)}, "train/")
  log.flush()
  with (tmp_path / "scalars.jsonl").open("a") as f:
    f.write('{"step": 5, "train/lo')         # a line torn by the kill
  resumed = metric_log.MetricLog(tmp_path, start_step=2)
  for step in (3, 4):
    resumed.scalars(step, {"loss": 10.0 * step}, "train/")
  resumed.close()
  assert metric_log.read_scalars(tmp_path)["train/loss"] == [
      (1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]


@pytest.fixture(scope="module")
def tiny_workdir(tmp_path_factory):
  """A training workdir as the trainer writes it: an orbax step with the full
  train state (sharded over 2 devices), meta, and its scalars."""
  from offseg_jax import checkpointing, optim  # pylint: disable=g-import-not-at-top
  from offseg_jax.models import construction  # pylint: disable=g-import-not-at-top
  config = tiny_config()
  workdir = tmp_path_factory.mktemp("workdir")
  info = datasets.dataset_info(config.data)
  model = construction.create_model(config, info.num_classes)
  variables = jax.jit(functools.partial(construction.init_variables, model, config))(
      jax.random.PRNGKey(1))
  tx, _ = optim.build_optimizer(config, variables["params"])
  state = {"step": jnp.asarray(7, jnp.int32), "params": variables["params"],
           "batch_stats": variables["batch_stats"],
           "opt_state": jax.jit(tx.init)(variables["params"]), "rng": jax.random.PRNGKey(0)}
  mesh = jax.make_mesh((jax.device_count(),), ("data",),
                       axis_types=(jax.sharding.AxisType.Auto,))
  state = jax.device_put(state, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  manager = checkpointing.make_manager(str(workdir), async_save=False)
  checkpointing.save(manager, 7, state, {"model": "tiny", "num_classes": info.num_classes},
                     metrics={"mIoU": 1.0}, force=True)
  manager.wait_until_finished()
  manager.close()
  log = metric_log.MetricLog(workdir)
  for step in (1, 4, 7):
    log.scalars(step, {"loss": 2.0 / step}, "train/")
  log.close()
  cfg_file = workdir / "tiny_cfg.py"
  cfg_file.write_text(textwrap.dedent(f"""
      import sys
      sys.path.insert(0, {REPO!r})
      sys.path.insert(0, {os.path.join(REPO, "tests")!r})
      from test_eval_tools import tiny_config

      def get_config(arg=None):
        return tiny_config(arg or "whole")
  """))
  return config, workdir, cfg_file, variables


def test_evaluate_command_writes_metrics_confusion_and_report(tiny_workdir):
  config, workdir, cfg_file, _ = tiny_workdir
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  cmd = [sys.executable, "-m", "offseg_jax.evaluate", f"--config={cfg_file}:slide",
         f"--checkpoint={workdir}", "--config.eval.batch_size=2", "--num_samples=2"]
  result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "mIoU" in result.stdout and "v_stripes" in result.stdout      # per-class table
  out = workdir / "eval"          # default: WORKDIR/eval, never over the trainer's files
  metrics_json = json.loads((out / "metrics.json").read_text())
  assert {"aAcc", "mIoU", "mAcc", "mDice"} <= set(metrics_json)
  assert set(metrics_json["per_class"]) == set(datasets.dataset_info(config.data).class_names)
  assert metrics_json["meta"]["mode"] == "slide" and metrics_json["meta"]["num_images"] == 5
  confusion = np.load(out / "confusion.npy")
  assert confusion.sum() == labelled_pixels(config)
  for png in ("confusion.png", "per_class_iou.png", "samples.png", "training_curves.png"):
    assert (out / png).stat().st_size > 1000, png
    assert png in (out / "report.md").read_text()


def test_evaluate_restored_checkpoint_matches_in_memory_variables(tiny_workdir, tmp_path):
  from offseg_jax import evaluate  # pylint: disable=g-import-not-at-top
  from offseg_jax.models import construction  # pylint: disable=g-import-not-at-top
  from offseg_jax.conversion import variables_io  # pylint: disable=g-import-not-at-top
  config, workdir, _, variables = tiny_workdir
  # A step directory saved on 2 devices, restored onto one.
  summary = evaluate.run(config, str(workdir / "checkpoints" / "7"), output=str(tmp_path),
                         report=False, progress=False)
  model = construction.create_model(config, datasets.dataset_info(config.data).num_classes)
  direct, confusion = runner.evaluate_model(model, variables, config, progress=False)
  assert summary["mIoU"] == direct["mIoU"]
  np.testing.assert_array_equal(np.load(tmp_path / "confusion.npy"), confusion)
  # A converted checkpoint directory loads the same weights.
  converted = variables_io.save_variables(tmp_path / "converted", variables, {"model": "tiny"})
  _, restored, _ = runner.load_model(config, converted)
  for a, b in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(variables)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_predict_writes_palette_overlay_and_raw_pngs_that_score_like_evaluate(
    tiny_workdir, tmp_path):
  from offseg_jax import predict  # pylint: disable=g-import-not-at-top
  config, workdir, _, _ = tiny_workdir
  source = datasets.build_source(config.data, "val")
  images = tmp_path / "images"
  (images / "nested").mkdir(parents=True)
  for i in range(len(source)):
    folder = images / "nested" if i == 0 else images
    Image.fromarray(source[i]["image"]).save(folder / f"{source[i]['name']}.png")
  out = tmp_path / "out"
  written = predict.run(config, str(workdir), images, out, opacity=0.6, progress=False)
  assert len(written) == len(source)
  first = written[0]
  palette_png = Image.open(first["palette"])
  assert palette_png.mode == "P" and palette_png.size == (64, 64)
  assert np.asarray(Image.open(first["overlay"])).shape == (64, 64, 3)
  # raw/ holds the labels in the dataset convention: evaluate --predictions scores them.
  os.replace(out / "raw" / "nested" / f"{source[0]['name']}.png",
             out / "raw" / f"{source[0]['name']}.png")
  _, scored = runner.score_predictions(out / "raw", config, progress=False)
  model, variables, _ = runner.load_model(config, str(workdir))
  _, expected = runner.evaluate_model(model, variables, config, progress=False)
  np.testing.assert_array_equal(scored, expected)
  (images / "broken.jpg").write_bytes(b"not a jpeg")
  with pytest.raises(ValueError, match="broken.jpg"):
    predict.run(config, str(workdir), images, out, progress=False)


def test_benchmark_reports_train_and_inference_throughput():
  from offseg_jax.tools import benchmark  # pylint: disable=g-import-not-at-top
  config = tiny_config()
  # The per-pixel model keeps the train-step compile short; the tool is the same.
  config.model = ml_collections.ConfigDict({"name": "pixel_linear", "hidden": 8})
  results = benchmark.benchmark(config, batch=2, steps=2, warmup=1, size=(64, 64),
                                slide_size=(64, 96), verbose=False)
  for mode in ("train", "whole", "slide"):
    assert results[mode]["images_per_s"] > 0, mode
  assert results["slide"]["windows"] == 3 * 4
  assert results["platform"] == jax.devices()[0].platform and results["dtype"] == "float32"
  assert results["model"] == "pixel_linear" and results["params_M"] > 0


def test_benchmark_times_each_step_and_reports_the_median(monkeypatch):
  from offseg_jax.tools import benchmark  # pylint: disable=g-import-not-at-top
  ticks = iter([0.0, 1.0,  10.0, 10.5,  20.0, 23.0,  30.0, 30.7])   # first call, then 3 steps
  monkeypatch.setattr(benchmark.time, "perf_counter", lambda: next(ticks))
  first, times = benchmark._time(lambda: 0, steps=3, warmup=0)
  assert first == 1.0 and times == pytest.approx([0.5, 3.0, 0.7])
  summary = benchmark._summary(first, times, 4, "step")
  assert summary["median_s"] == pytest.approx(0.7)          # not the mean (1.4)
  assert summary["images_per_s"] == pytest.approx(4 / 0.7)
  with pytest.raises(ValueError, match="steps must be at least 1"):
    benchmark.step_times(lambda: 0, steps=0, warmup=0)   # no empty median later


def test_compare_with_torch_prints_ratios_from_the_same_settings(monkeypatch, capsys):
  from offseg_jax.tools import benchmark, torch_anchor  # pylint: disable=g-import-not-at-top
  calls = []

  def fake_torch(**kwargs):                 # stands in for the PyTorch run (no torch here)
    calls.append(kwargs)
    median = 0.9 if kwargs["compiled"] else 1.8
    return {"torch": "x", "transformers": "y", "threads": kwargs["threads"],
            **{m: {"median_s": median} for m in kwargs["modes"]}}

  monkeypatch.setattr(torch_anchor, "benchmark", fake_torch)
  ours = {"model": "segformer_b0", "platform": "cpu", "batch": 2, "size": [512, 512],
          "num_classes": 150, "steps": 5, "warmup": 1, "dtype": "float32",
          "train": {"median_s": 1.2}, "whole": {"median_s": 0.3}}
  results = benchmark.compare_with_torch(ours, threads=2)
  assert [c["compiled"] for c in calls] == [False, True]
  assert all(c["batch"] == 2 and c["size"] == (512, 512) and c["num_classes"] == 150
             and c["dtype"] == "float32" and c["device"] == "cpu" and c["threads"] == 2
             and c["modes"] == ["train", "whole"] for c in calls)
  assert results["torch"]["eager"]["train"]["ratio"] == pytest.approx(1.5)
  assert results["torch"]["compiled"]["whole"]["ratio"] == pytest.approx(3.0)
  assert "| train | 1200 ms | 1800 ms | 1.50x | 900 ms | 0.75x |" in capsys.readouterr().out


def test_the_torch_anchor_names_its_install_command_when_torch_is_missing(monkeypatch):
  from offseg_jax.tools import torch_anchor  # pylint: disable=g-import-not-at-top
  monkeypatch.setitem(sys.modules, "torch", None)           # as if torch were absent
  with pytest.raises(ImportError, match=r"pip install -e \.\[compare\]"):
    torch_anchor.benchmark(batch=1, size=(32, 32))


def test_the_torch_anchor_is_segformer_b0_with_mmseg_parameter_groups():
  pytest.importorskip("torch")
  pytest.importorskip("transformers")
  from offseg_jax.tools import torch_anchor  # pylint: disable=g-import-not-at-top
  model = torch_anchor.segformer_b0(150)
  # MiT-B0 + the all-MLP head with 150 classes: 3.75 M parameters (mmseg's 3.7 M).
  assert sum(p.numel() for p in model.parameters()) == pytest.approx(3.75e6, rel=0.01)
  groups = torch_anchor.parameter_groups(model, lr=6e-5, weight_decay=0.01)
  assert sorted((round(g["lr"] / 6e-5), g["weight_decay"]) for g in groups) == [
      (1, 0.0), (1, 0.01), (10, 0.0), (10, 0.01)]
  assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
  results = torch_anchor.benchmark(batch=1, size=(64, 64), num_classes=150, steps=1,
                                   warmup=0, modes=("train", "whole"))
  assert results["train"]["images_per_s"] > 0 and results["whole"]["images_per_s"] > 0
