"""Data tools: pack (tfds ArrayRecord round trip), check, Cityscapes converter, the
input benchmark (offseg_jax.tools.benchmark_input)."""

import os
import subprocess
import sys

import cv2
import numpy as np
import pytest

from input_pipeline import check
from input_pipeline import cityscapes_convert
from input_pipeline import datasets
from input_pipeline import image_io
from input_pipeline import pack
from offseg_jax.tools import benchmark_input

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_CONFIG_FILE = '''
import ml_collections
from input_pipeline import datasets

def get_config(arg=None):
  config = ml_collections.ConfigDict()
  config.data = datasets.default_data_config(arg or "ade20k")
  return config
'''


def _run_cli(module, *args):
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=120)


def _write(path, array):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  assert cv2.imwrite(str(path), array)


def _ade(tmp_path, num_train=3, num_val=2):
  """ADE20K layout with stored labels 0..150 (0 = ignore after reduction)."""
  rng = np.random.default_rng(0)
  root = tmp_path / "ADEChallengeData2016"
  for split, n in (("training", num_train), ("validation", num_val)):
    for i in range(n):
      h, w = 40 + 4 * i, 56 + 8 * i
      _write(root / f"images/{split}/ADE_{split}_{i:04d}.jpg",
             rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
      _write(root / f"annotations/{split}/ADE_{split}_{i:04d}.png",
             rng.integers(0, 151, (h, w)).astype(np.uint8))
  config = datasets.default_data_config("ade20k")
  config.root = str(root)
  return config, root


def _assert_same_examples(a, b):
  assert len(a) == len(b)
  for i in range(len(a)):
    x, y = a[i], b[i]
    assert x["name"] == y["name"]
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["label"], y["label"])


# ---------------------------------------------------------------- pack


def test_pack_round_trips_through_tfds_data_source(tmp_path):
  config, _ = _ade(tmp_path / "src")
  out = tmp_path / "packed"
  target = pack.pack(config, ("train", "val"), str(out), log=lambda *_: None)
  assert target == str(out / "offseg_ade20k" / "1.0.0")
  loaded = datasets.default_data_config("tfds")
  loaded.root = str(out)     # the folder holding a single packed dataset
  info = datasets.dataset_info(loaded)
  assert (info.num_classes, info.reduce_zero_label, info.class_names[:2]) == \
      (150, True, ("wall", "building"))
  for split in ("train", "val"):
    _assert_same_examples(datasets.build_source(config, split),
                          datasets.build_source(loaded, split))
  # By name through tfds.data_source, like any prepared tfds dataset.
  loaded.tfds_name, loaded.root = "offseg_ade20k", str(out)
  _assert_same_examples(datasets.build_source(config, "val"), datasets.build_source(loaded, "val"))
  with pytest.raises(FileExistsError, match="--overwrite"):
    pack.pack(config, ("train",), str(out), log=lambda *_: None)


def test_pack_synthetic_stores_pngs_exactly(tmp_path):
  config = datasets.default_data_config("synthetic")
  config.num_train, config.num_val, config.image_size = 3, 2, 32
  pack.pack(config, ("train", "val"), str(tmp_path), log=lambda *_: None)
  loaded = datasets.default_data_config("tfds")
  loaded.root = str(tmp_path / "offseg_synthetic" / "1.0.0")
  assert datasets.dataset_info(loaded).class_names == datasets.dataset_info(config).class_names
  _assert_same_examples(datasets.build_source(config, "train"),
                        datasets.build_source(loaded, "train"))


def test_pack_bad_file_stops_or_is_left_out(tmp_path):
  config, root = _ade(tmp_path / "src", num_train=3, num_val=1)
  bad = root / "images/training/ADE_training_0001.jpg"
  bad.write_bytes(bad.read_bytes()[:200])
  with pytest.raises(image_io.BadFileError, match="ADE_training_0001.jpg: truncated"):
    pack.pack(config, ("train",), str(tmp_path / "a"), log=lambda *_: None)
  config.skip_bad_files = True
  lines = []
  target = pack.pack(config, ("train",), str(tmp_path / "b"), log=lines.append)
  assert any("2 examples written, 1 bad" in line for line in lines)
  assert any("ADE_training_0001.jpg" in line for line in lines)
  loaded = datasets.default_data_config("tfds")
  loaded.root = target
  source = datasets.build_source(loaded, "train")
  assert [source[i]["name"] for i in range(len(source))] == ["ADE_training_0000",
                                                             "ADE_training_0002"]


def test_foreign_tfds_dataset_features_mapped_by_config(tmp_path):
  """A scene_parse150-like dataset: 'annotation' stored as an RGB PNG, no names."""
  import tensorflow_datasets as tfds
  rng = np.random.default_rng(0)
  pairs = [(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8),
            rng.integers(0, 4, (20, 30)).astype(np.uint8)) for _ in range(3)]

  class SceneLike(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version("1.0.0")
    code_path = None

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(encoding_format="jpeg"),
          "annotation": tfds.features.Image(encoding_format="png")}), disable_shuffling=True)

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples(), "test": self._generate_examples()}

    def _generate_examples(self):
      for i, (image, label) in enumerate(pairs):
        yield i, {"image": cv2.imencode(".jpg", image)[1].tobytes(),
                  "annotation": cv2.imencode(".png", np.dstack([label] * 3))[1].tobytes()}

  builder = SceneLike(data_dir=str(tmp_path), file_format="array_record")
  builder.download_and_prepare(download_dir=str(tmp_path / "dl"))
  config = datasets.default_data_config("tfds")
  config.root, config.tfds_label_key, config.tfds_name_key = builder.data_dir, "annotation", ""
  config.class_names, config.split_names.val = ("a", "b", "c", "d"), "test"
  with pytest.raises(image_io.BadFileError, match=r"annotation: label is a 3-channel"):
    datasets.build_source(config, "val")[0]
  config.tfds_label_channel = 0
  source = datasets.build_source(config, "val")
  example = source[1]
  np.testing.assert_array_equal(example["label"], pairs[1][1])
  assert example["image"].shape == (20, 30, 3) and example["name"] == "val_000001"
  config.tfds_label_key = "segmentation"
  with pytest.raises(ValueError, match=r"features \['annotation', 'image'\].*tfds_label_key"):
    datasets.build_source(config, "val")


def test_pack_cli_with_config_arg_and_overrides(tmp_path):
  config, root = _ade(tmp_path / "src", num_train=2, num_val=1)
  config_file = tmp_path / "cfg.py"
  config_file.write_text(_CONFIG_FILE)
  result = _run_cli("input_pipeline.pack", f"--config={config_file}:ade20k",
                    f"--config.data.root={root}", "--split=val", f"--output={tmp_path / 'out'}")
  assert result.returncode == 0, result.stderr[-2000:]
  assert "val: 1 examples written" in result.stdout
  loaded = datasets.default_data_config("tfds")
  loaded.root = str(tmp_path / "out")
  _assert_same_examples(datasets.build_source(config, "val"), datasets.build_source(loaded, "val"))


def test_pack_prints_a_load_command_that_works_with_the_same_config(tmp_path):
  """As a user would: pack with an experiment config, load with the printed flags."""
  _, root = _ade(tmp_path / "src", num_train=2, num_val=1)
  config_flag = "--config=experiments/configs/offseg.py:t,ade20k"
  result = _run_cli("input_pipeline.pack", config_flag, f"--config.data.root={root}",
                    f"--output={tmp_path / 'out'}")
  assert result.returncode == 0, result.stderr[-2000:]
  last = result.stdout.strip().splitlines()[-1]
  assert last.startswith("load it with the same --config and: ")
  printed = last.split(": ", 1)[1].split()
  target = tmp_path / "out" / "offseg_ade20k" / "1.0.0"
  assert printed == ["--config.data.name=tfds", f"--config.data.root={target}"]
  result = _run_cli("input_pipeline.check", config_flag, *printed, "--nohistogram")
  assert result.returncode == 0, result.stdout[-2000:]
  assert "train: 2 examples checked, 0 problems" in result.stdout
  assert "val: 1 examples checked, 0 problems" in result.stdout
  # The same packed copy read with a config made for another dataset is refused.
  other = datasets.default_data_config("cityscapes")
  other.name, other.root = "tfds", str(target)
  with pytest.raises(ValueError, match=r"packed copy of 'ade20k', but config.data was made "
                     r"for 'cityscapes'.*--config=experiments/configs/offseg.py:t,ade20k "
                     r"--config.data.name=tfds"):
    datasets.dataset_info(other)


def test_packed_own_folders_load_with_the_config_they_were_packed_with(tmp_path):
  """Custom folders read with ADE20K's recipe, packed, then loaded as tfds on that config."""
  rng = np.random.default_rng(0)
  for stem in ("a", "b"):
    _write(tmp_path / f"mine/img_dir/val/{stem}.jpg", rng.integers(0, 256, (24, 32, 3),
                                                                    dtype=np.uint8))
    _write(tmp_path / f"mine/ann_dir/val/{stem}.png", rng.integers(0, 3, (24, 32), dtype=np.uint8))
  config = datasets.default_data_config("ade20k")    # e.g. offseg.py:t,ade20k
  config.name, config.root = "custom", str(tmp_path / "mine")
  config.class_names = ("sky", "road", "car")
  target = pack.pack(config, ("val",), str(tmp_path / "out"), log=lambda *_: None)
  loaded = config.copy_and_resolve_references()
  loaded.name, loaded.root = "tfds", target          # what the packer says to add
  assert datasets.dataset_info(loaded).class_names == ("sky", "road", "car")
  _assert_same_examples(datasets.build_source(config, "val"), datasets.build_source(loaded, "val"))
  synthetic = datasets.default_data_config("synthetic")
  synthetic.name, synthetic.root = "tfds", target
  with pytest.raises(ValueError, match=r"data.name='tfds' does not fit .* made for 'synthetic'"):
    datasets.dataset_info(synthetic)


# ---------------------------------------------------------------- check


def _broken_custom_dataset(tmp_path):
  """A custom dataset with one clean pair and one of every problem type."""
  root = tmp_path / "broken"
  rng = np.random.default_rng(0)
  images = {s: rng.integers(0, 256, (30, 40, 3), dtype=np.uint8) for s in "abcdefgh"}
  labels = {s: rng.integers(0, 3, (30, 40)).astype(np.uint8) for s in "abcdefgh"}
  labels["e"][2, 2] = 9                                      # value outside 3 classes
  labels["f"] = labels["f"][:20]                             # size mismatch
  for s in "abcdefgh":
    _write(root / f"img_dir/train/{s}.jpg", images[s])
    _write(root / f"ann_dir/train/{s}.png", labels[s])
  os.remove(root / "ann_dir/train/b.png")                    # image without label
  _write(root / "ann_dir/train/z.png", labels["a"])          # label without image
  truncated = root / "img_dir/train/c.jpg"
  truncated.write_bytes(truncated.read_bytes()[:150])        # truncated image
  (root / "ann_dir/train/g.png").write_bytes(b"not an image")  # unreadable label
  _write(root / "ann_dir/train/d.png", np.dstack([labels["d"]] * 3) + [0, 0, 1])  # RGB label
  config = datasets.default_data_config("custom")
  config.root, config.class_names = str(root), ("sky", "road", "car")
  return config, root


def test_check_flags_each_problem_type(tmp_path):
  config, root = _broken_custom_dataset(tmp_path)
  report = check.check_split(config, "train", num_threads=2)
  by_file = {(os.path.basename(p.path), p.kind) for p in report.problems}
  assert by_file == {("b.jpg", image_io.MISSING), ("z.png", check.ORPHAN_LABEL),
                     ("c.jpg", image_io.TRUNCATED), ("d.png", image_io.RGB_LABEL),
                     ("e.png", image_io.LABEL_VALUES), ("f.png", image_io.SIZE_MISMATCH),
                     ("g.png", image_io.UNREADABLE)}
  # Histogram over the decodable single-channel labels: a, c, e, f, h.
  assert report.pixel_counts[:3].sum() == 4 * 30 * 40 + 20 * 40 - 1
  assert report.image_counts[9] == 1
  text = check.format_report(report, datasets.dataset_info(config))
  assert "car" in text and "% labelled" in text and "c.jpg: truncated JPEG" in text


def test_check_cli_exit_codes(tmp_path):
  config, root = _broken_custom_dataset(tmp_path)
  config_file = tmp_path / "cfg.py"
  config_file.write_text(_CONFIG_FILE)
  result = _run_cli("input_pipeline.check", f"--config={config_file}:custom",
                    f"--config.data.root={root}", "--config.data.class_names=('a','b','c')",
                    "--split=train", "--nohistogram")
  assert result.returncode == 1, result.stderr[-2000:]
  assert "truncated image or label: 1" in result.stdout and "FAILED: 7 problems" in result.stdout
  clean, _ = _ade(tmp_path / "clean", num_train=2, num_val=1)
  lines = []
  assert check.check(clean, ("train", "val"), log=lines.append) == 0
  assert lines[-1].startswith("OK: 0 problems")


# ---------------------------------------------------------------- cityscapes converter

# Cityscapes label ids with a training id (all other ids, and unknown values, -> 255).
_EXPECTED_TRAIN_IDS = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9,
                       23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}


def test_cityscapes_converter_maps_every_id(tmp_path):
  ids = np.concatenate([np.arange(34), [40, 255]]).astype(np.uint8)
  label_ids = np.tile(ids, (4, 2))
  for split, city in (("train", "aachen"), ("val", "lindau")):
    _write(tmp_path / f"gtFine/{split}/{city}/{city}_000000_000019_gtFine_labelIds.png",
           label_ids)
  result = _run_cli("input_pipeline.cityscapes_convert", tmp_path, "--nproc=2")
  assert result.returncode == 0, result.stderr[-2000:]
  assert "wrote 2" in result.stdout and "ids above 33" in result.stdout
  expected = np.array([_EXPECTED_TRAIN_IDS.get(int(i), 255) for i in ids], np.uint8)
  for split, city in (("train", "aachen"), ("val", "lindau")):
    out = cv2.imread(str(tmp_path / f"gtFine/{split}/{city}/"
                         f"{city}_000000_000019_gtFine_labelTrainIds.png"), cv2.IMREAD_UNCHANGED)
    np.testing.assert_array_equal(out, np.tile(expected, (4, 2)))
  with pytest.raises(FileNotFoundError, match="gtFine"):
    cityscapes_convert.convert(str(tmp_path / "nothing"))


# ---------------------------------------------------------------- benchmark


def test_benchmark_runs_the_full_pipeline_on_fake_data(tmp_path):
  config = datasets.default_data_config("cityscapes")
  config.root, config.crop_size = str(tmp_path), (32, 48)
  benchmark_input.write_fake_dataset(config, str(tmp_path), 3, size=(96, 48))
  assert (tmp_path / "leftImg8bit/train/fake/fake_train_000000_leftImg8bit.png").is_file()
  lines = []
  result = benchmark_input.benchmark(config, workers=2, batches=2, batch_size=2, warmup=1,
                                     log=lines.append)
  assert result["batch_image_shape"] == (2, 32, 48, 3)
  assert result["images_per_s"] > 0 and result["cpu_ms_per_image"] > 0
  assert "images/s" in lines[1] and "decode" in lines[2]


def test_benchmark_command_times_both_transfer_paths_in_process(tmp_path, capsys):
  config_file = tmp_path / "cfg.py"
  config_file.write_text(_CONFIG_FILE)
  args = [f"--config={config_file}:cityscapes", "--config.data.crop_size=(32, 48)",
          "--fake=2", "--fake-size=96,48", "--workers=1", "--batches=1", "--batch_size=2",
          "--warmup=0"]
  assert benchmark_input.main(args) == 0
  out = capsys.readouterr().out
  assert "crop (32, 48)" in out
  assert "loader + transfer (float32)" in out and "loader + transfer (uint8)" in out
  assert "uint8 transfer vs float32" in out
  # Bad input: one line, exit status 2.
  assert benchmark_input.main(args + ["extra"]) == 2
  assert capsys.readouterr().err.strip().splitlines() == [
      "error: unexpected argument: extra (see --help)"]
