"""The one evaluator: batched, bucketed, sharded over devices and processes.

A small folder dataset with images of many sizes and the tiny model: the same
metrics on 2 processes x 2 devices as on 1 device, at most one model compile per
bucket and mode, slide = whole where the window covers the image, checkpoints
that carry their config (and refuse one that disagrees), bad validation files
(one-line message, or skipped and counted, never costing training progress),
and prediction of odd-sized images with every registered model.
"""

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from input_pipeline import datasets, image_io
from offseg_jax import checkpointing
from offseg_jax.evaluation import evaluator as evaluator_lib
from offseg_jax.evaluation import geometry
from offseg_jax.models import MODELS, build_model, construction

REPO = Path(__file__).resolve().parents[1]
CLASSES = ("background", "red", "green", "blue", "grey")
# Original sizes of the validation images: odd sides, 4 buckets (two shared).
VAL_SIZES = [(37, 53), (64, 48), (90, 70), (39, 50), (60, 44), (33, 80)]


def write_split(root: Path, split: str, sizes, seed: int = 0) -> list[str]:
  """A ``custom`` folder split: blocky labels (some 255) and images coloured by class."""
  rng = np.random.default_rng(seed)
  img_dir, ann_dir = root / "img_dir" / split, root / "ann_dir" / split
  img_dir.mkdir(parents=True, exist_ok=True)
  ann_dir.mkdir(parents=True, exist_ok=True)
  colours = np.array([[20, 20, 20], [200, 40, 40], [40, 200, 40], [40, 40, 200], [128, 128, 128]])
  names = []
  for i, (h, w) in enumerate(sizes):
    cells = rng.integers(0, len(CLASSES), (h // 12 + 1, w // 12 + 1)).astype(np.uint8)
    label = cv2.resize(cells, (w, h), interpolation=cv2.INTER_NEAREST)
    label[:2] = 255
    image = np.clip(colours[label % len(CLASSES)] + rng.normal(0, 25, (h, w, 3)), 0, 255)
    name = f"{split}_{i:03d}"
    cv2.imwrite(str(img_dir / f"{name}.jpg"), image.astype(np.uint8)[:, :, ::-1])
    cv2.imwrite(str(ann_dir / f"{name}.png"), label)
    names.append(name)
  return names


def make_config(root: Path, mode: str = "whole", batch_size: int = 4):
  from experiments.configs import common  # pylint: disable=g-import-not-at-top
  c = common.base_config()
  c.seed = 0
  c.batch_size = 2
  c.total_steps = 2
  c.eval_every = c.checkpoint_every = c.log_every = 2
  c.model = common.model_config("tiny")
  c.model.widths = (8, 8, 16, 16)
  c.model.channels = 16
  c.data = common.data_config("custom", root=str(root), class_names=CLASSES,
                              crop_size=(32, 32), train_scale=(), test_scale=(),
                              photometric=False, cat_max_ratio=1.0, num_threads=2, prefetch=4)
  c.optimizer.warmup_steps = 1
  c.eval.mode = mode
  c.eval.crop_size = (32, 32)
  c.eval.stride = (24, 24)
  c.eval.batch_size = batch_size
  return c


def labelled_pixels(root: Path, split: str = "val", skip=()) -> int:
  return sum(int((np.asarray(Image.open(p)) != 255).sum())
             for p in sorted((root / "ann_dir" / split).glob("*.png")) if p.stem not in skip)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
  root = tmp_path_factory.mktemp("evaldata")
  write_split(root, "val", VAL_SIZES)
  write_split(root, "train", [(40, 40)] * 4, seed=1)
  return root


def random_variables(model, config, seed: int = 3):
  """Variables of the model's shapes, drawn on the host: no init to compile.
  Weights N(0, 0.3), BatchNorm means 0 and variances 1."""
  abstract = jax.eval_shape(functools.partial(construction.init_variables, model, config),
                            jax.random.PRNGKey(0))
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = str(getattr(path[-1], "key", path[-1]))
    if name == "var":
      return np.ones(leaf.shape, leaf.dtype)
    if name == "mean":
      return np.zeros(leaf.shape, leaf.dtype)
    return rng.normal(0, 0.3, leaf.shape).astype(leaf.dtype)

  return jax.tree_util.tree_map_with_path(draw, abstract)


@pytest.fixture(scope="module")
def tiny(data_root):
  """(config, model, variables) of the tiny model on the dataset."""
  config = make_config(data_root)
  model = construction.create_model(config, len(CLASSES))
  return config, model, random_variables(model, config)


@pytest.fixture(scope="module")
def workdir(tiny, tmp_path_factory) -> Path:
  """A training workdir whose checkpoint carries its config, as the trainer saves it."""
  config, _, variables = tiny
  workdir = tmp_path_factory.mktemp("workdir")
  state = {"step": jnp.asarray(2, jnp.int32), **variables}
  manager = checkpointing.make_manager(str(workdir), async_save=False)
  meta = {"model": config.model.name, "num_classes": len(CLASSES), "dataset": "custom",
          "config": json.loads(config.to_json_best_effort())}
  checkpointing.save(manager, 2, state, meta, force=True)
  manager.wait_until_finished()
  manager.close()
  return workdir


def one_device_confusion(config, model, variables, **kw) -> np.ndarray:
  config = config.copy_and_resolve_references()
  config.eval.batch_size = 1
  ev = evaluator_lib.Evaluator(model, config, devices=jax.devices()[:1], **kw)
  return ev.evaluate(variables).confusion


def test_two_processes_of_two_devices_score_like_one_device(tiny, workdir, data_root,
                                                           tmp_path):
  config, model, variables = tiny
  # The checkpoint alone (its own config), on 2 processes x 2 devices.
  out = tmp_path / "eval"
  proc = subprocess.run(
      [sys.executable, "-m", "launch.local", "--processes=2", "--devices_per_process=2",
       f"--log_dir={tmp_path / 'logs'}", "--", sys.executable, "-m", "offseg_jax.evaluate",
       f"--checkpoint={workdir}", f"--output={out}", "--report=false"],
      cwd=REPO, capture_output=True, text=True, timeout=600,
      env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO)))
  logs = "".join(p.read_text()[-2000:] for p in (tmp_path / "logs").glob("*.log"))
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + logs
  assert f"evaluated {len(VAL_SIZES)} val images" in proc.stdout
  assert "on 4 devices" in proc.stdout and "compiles:" in proc.stdout
  meta = json.loads((out / "metrics.json").read_text())["meta"]
  assert meta["processes"] == 2 and meta["devices"] == 4
  confusion = np.load(out / "confusion.npy")
  # Every image exactly once, padding never counted ...
  assert confusion.sum() == labelled_pixels(data_root)
  # ... and every pixel predicted as on a single device.
  np.testing.assert_array_equal(confusion, one_device_confusion(config, model, variables))


def test_at_most_one_model_compile_per_bucket_and_mode(tiny):
  config, model, variables = tiny
  ev = evaluator_lib.Evaluator(model, config)
  first = ev.evaluate(variables)
  buckets = ev.batches("val").plan.buckets()
  assert len(buckets) == 4 < len(set(VAL_SIZES))     # sizes share buckets
  assert first.model_compiles == len(buckets)
  assert first.compiles == 2 * len(buckets)              # + one finishing step per bucket
  again = ev.evaluate(variables)
  assert again.compiles == 0 and again.summary == first.summary
  np.testing.assert_array_equal(again.confusion, first.confusion)
  # A new evaluator of the same model (the next evaluation of a training run
  # builds none, but tools may) reuses the compiled steps.
  assert evaluator_lib.Evaluator(model, config).evaluate(variables).compiles == 0
  # Slide mode: every window has the crop's shape, so one model compile serves
  # every bucket.
  slide = evaluator_lib.Evaluator(model, config, mode="slide")
  before = slide.engine.model_compiles
  result = slide.evaluate(variables)
  assert slide.engine.model_compiles - before == 1
  assert result.confusion.sum() == first.confusion.sum()
  assert "compiles:" in slide.describe(result)


def test_slide_equals_whole_where_the_window_covers_the_image(tiny, data_root):
  config, model, variables = tiny
  config = config.copy_and_resolve_references()
  config.eval.crop_size = (128, 128)            # larger than every bucket
  config.eval.stride = (96, 96)
  source = datasets.build_source(config.data, "val")
  outputs = {}
  for mode in ("whole", "slide"):
    ev = evaluator_lib.Evaluator(model, config, mode=mode)
    found = {}
    ev.predict(variables, source, lambda i, ex, out: found.__setitem__(i, out),
               with_scores=True)
    outputs[mode] = found
  assert sorted(outputs["whole"]) == list(range(len(VAL_SIZES)))
  for i, (labels, scores) in outputs["whole"].items():
    slide_labels, slide_scores = outputs["slide"][i]
    assert scores.shape == VAL_SIZES[i] + (len(CLASSES),)
    np.testing.assert_allclose(slide_scores, scores, atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(slide_labels, labels)


def test_buckets_pad_a_little_and_images_keep_their_own_size():
  settings = geometry.InferenceSettings(mode="whole")
  geo = geometry.Geometry(settings, divisor=32)
  for n in (1, 31, 33, 100, 512, 513, 683, 2047):
    side = geometry.bucket_side(n, 32, 4)
    assert side >= n and side % 32 == 0 and side - n < max(n / 4, 32)
  assert geometry.bucket_side(683, 1, 0) == 683             # exact sizes
  assert geo.bucket((120, 160)) == (128, 160)
  plan = geometry.build_plan({i: s for i, s in enumerate(VAL_SIZES)},
                             geometry.Geometry(settings), batch_size=4, num_processes=2)
  assert sorted(plan.indices(0) + plan.indices(1)) == list(range(len(VAL_SIZES)))
  assert len(plan.entries(0)) == len(plan.entries(1))      # the same steps everywhere
  for shape, slots in zip(plan.shapes, plan.slots):
    assert len(slots) == 2 * shape.per_device == 2         # a small group: a small batch
    for i in slots:
      if i >= 0:
        h, w = VAL_SIZES[i]
        assert shape.views[0].bucket[0] >= h and shape.label[0] >= h and shape.label[1] >= w
        assert shape.label[0] % geometry.TILE_ROWS == 0 and shape.label[1] % geometry.TILE_COLS == 0


def test_checkpoint_carries_its_config_and_a_mismatched_config_is_refused(tiny, workdir):
  from offseg_jax import evaluate  # pylint: disable=g-import-not-at-top
  config, _, _ = tiny
  restored, _, _, _ = evaluator_lib.load_for_eval(str(workdir))
  assert restored.model.widths == (8, 8, 16, 16) and restored.data.name == "custom"
  # Evaluation settings may differ ...
  other_eval = config.copy_and_resolve_references()
  other_eval.eval.mode = "slide"
  other_eval.eval.batch_size = 2
  evaluator_lib.load_for_eval(str(workdir), other_eval)
  # ... the model and the classes may not.
  wrong = config.copy_and_resolve_references()
  wrong.model.classifier = "feature_offset"
  wrong.data.class_names = CLASSES + ("extra",)
  with pytest.raises(checkpointing.ConfigMismatchError) as info:
    evaluate.run(wrong, str(workdir), report=False, progress=False)
  message = str(info.value)
  assert "\n" not in message
  assert "model.classifier" in message and "'feature_offset'" in message
  assert "number of classes: checkpoint 5, --config 6" in message


def test_bad_validation_file_is_reported_in_one_line_or_skipped_and_counted(data_root,
                                                                           tmp_path, tiny):
  _, model, variables = tiny
  root = tmp_path / "data"
  names = write_split(root, "val", VAL_SIZES[:4])
  bad = root / "img_dir" / "val" / f"{names[1]}.jpg"
  bad.write_bytes(bad.read_bytes()[:200])                  # a truncated JPEG
  config = make_config(root)
  with pytest.raises(image_io.BadFileError) as info:
    evaluator_lib.Evaluator(model, config).evaluate(variables)
  assert str(bad) in str(info.value) and "\n" not in str(info.value)
  assert "skip_bad_files" in str(info.value)
  config.data.skip_bad_files = True
  lines = []
  result = evaluator_lib.Evaluator(model, config, log=lines.append).evaluate(variables)
  assert result.num_images == 3 and len(result.bad_files) == 1 and str(bad) in result.bad_files[0]
  assert result.confusion.sum() == labelled_pixels(root, skip={names[1]})
  assert "skipped 1 bad file" in lines[-1]


def test_training_checks_pairing_first_and_saves_before_evaluating(tmp_path, capsys):
  from offseg_jax import train  # pylint: disable=g-import-not-at-top
  root = tmp_path / "data"
  write_split(root, "train", [(40, 40)] * 4, seed=1)
  names = write_split(root, "val", [(37, 53), (39, 50), (38, 51)])   # one bucket
  # An ADE20K-style mistake: a validation image without its label.
  (root / "ann_dir" / "val" / f"{names[2]}.png").unlink()
  config = make_config(root, batch_size=2)
  from experiments.configs import common  # pylint: disable=g-import-not-at-top
  config.model = common.model_config("pixel_linear")       # quick to compile
  with pytest.raises(image_io.BadFileError) as info:
    train.train_and_evaluate(config, str(tmp_path / "unpaired"))
  assert f"{names[2]}.jpg" in str(info.value) and "\n" not in str(info.value)
  assert not (tmp_path / "unpaired" / "checkpoints").exists()    # before the first step
  # A corrupt validation image: the step's checkpoint is saved before evaluating.
  write_split(root, "val", [(37, 53), (39, 50), (38, 51)])
  bad = root / "img_dir" / "val" / f"{names[0]}.jpg"
  bad.write_bytes(bad.read_bytes()[:200])
  run = tmp_path / "run"
  with pytest.raises(image_io.BadFileError, match=names[0]):
    train.train_and_evaluate(config, str(run))
  assert checkpointing.resolve_step_dir(str(run)).name == "2"
  # Skipping bad files, the rerun resumes there and evaluates what it can.
  config.data.skip_bad_files = True
  capsys.readouterr()
  summary = train.train_and_evaluate(config, str(run))
  out = capsys.readouterr().out
  assert "resumed from" in out and "skipped 1 bad file" in out
  assert json.loads((run / "metrics.json").read_text())["mIoU"] == summary["mIoU"]


def test_predict_segments_odd_sized_images_at_their_size(workdir, tmp_path):
  from offseg_jax import predict  # pylint: disable=g-import-not-at-top
  images = tmp_path / "photos"
  images.mkdir()
  sizes = [(120, 160), (75, 101), (33, 47)]
  for i, (h, w) in enumerate(sizes):
    Image.fromarray(np.random.default_rng(i).integers(0, 255, (h, w, 3), np.uint8)).save(
        images / f"photo_{i}.png")
  written = predict.run(None, str(workdir), images, tmp_path / "out", progress=False)
  for paths, (h, w) in zip(written, sizes):
    assert Image.open(paths["palette"]).size == (w, h)
    assert np.asarray(Image.open(paths["raw"])).shape == (h, w)


def test_offseg_nano_forward_on_a_120x160_image_is_padded_to_its_divisor(tiny):
  """The issue's crash: FreqFusion needs exact 2x pyramids (multiples of 32)."""
  config, _, _ = tiny
  config = config.copy_and_resolve_references()
  from experiments.configs import common  # pylint: disable=g-import-not-at-top
  config.model = common.model_config("offseg_nano")
  model = construction.create_model(config, len(CLASSES))
  ev = evaluator_lib.Evaluator(model, config, devices=jax.devices()[:1])
  assert ev.divisor == 32
  shape = geometry.BatchShape((ev.geometry.view_shape(ev.geometry.bucket((120, 160))),),
                              geometry.label_extent((120, 160)))
  host = {k: v[None] for k, v in ev.geometry.empty(shape).items()}
  abstract = jax.eval_shape(functools.partial(construction.init_variables, model, config),
                            jax.random.PRNGKey(0))
  consts = evaluator_lib.constants(ev.engine, 0, config.data.mean, config.data.std)
  acc = ev.engine.zeros(len(CLASSES))
  _, preds, _ = jax.eval_shape(
      lambda v: evaluator_lib.run_step(ev.engine, v, host, shape, acc, consts, tta=False),
      abstract)
  assert [p.shape for p in preds] == [(1, 128, 192)]           # whole tiles


@pytest.mark.parametrize("name", [n for n in MODELS.names() if not n.startswith("test_")])
def test_every_registered_model_takes_odd_sized_images(name):
  """Each model is padded to its size divisor: eval_shape of the forward at the
  bucket of a 75x101 image (one trace, no compile)."""
  from experiments.configs import common  # pylint: disable=g-import-not-at-top
  model = build_model(dict(common.model_config(name)), 19)
  divisor = construction.size_divisor(model)
  geo = geometry.Geometry(geometry.InferenceSettings(), divisor)
  hb, wb = geo.bucket((75, 101))
  assert hb % divisor == 0 and wb % divisor == 0 and hb >= 75 and wb >= 101
  logits, _ = jax.eval_shape(
      lambda k: model.init_with_output({"params": k, "ham": k, "dropout": k},
                                       jnp.zeros((1, hb, wb, 3)), train=False),
      jax.random.PRNGKey(0))[0]
  assert logits.shape[0] == 1 and logits.shape[-1] == 19
