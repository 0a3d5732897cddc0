"""Datasets: tiny fake datasets in each standard layout, loaded, augmented, batched."""

import importlib
import os
import re
import subprocess
import sys

import cv2
import grain
import ml_collections
import numpy as np
import pytest

from input_pipeline import dataset_config
from input_pipeline import datasets
from input_pipeline import image_io
from input_pipeline import transforms
from input_pipeline import synthetic

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write(path, array):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  assert cv2.imwrite(str(path), array)


def _photo(rng, h, w):
  return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


# Exact layouts written independently of input_pipeline's own tables:
# name -> (root below tmp (what data.root points at), [(image, label) per split]).
def _layout(name):
  if name == "ade20k":
    return "ade/ADEChallengeData2016", {
        "train": [(f"images/training/ADE_train_0000000{i}.jpg",
                   f"annotations/training/ADE_train_0000000{i}.png") for i in (1, 2)],
        "val": [("images/validation/ADE_val_00000001.jpg",
                 "annotations/validation/ADE_val_00000001.png")]}
  if name == "cityscapes":
    def pair(split, city, k):
      stem = f"{city}/{city}_000000_0000{k}"
      return (f"leftImg8bit/{split}/{stem}_leftImg8bit.png",
              f"gtFine/{split}/{stem}_gtFine_labelTrainIds.png")
    return "cityscapes", {"train": [pair("train", "aachen", 19), pair("train", "bochum", 21)],
                          "val": [pair("val", "frankfurt", 10)]}
  if name == "coco_stuff164k":
    return "coco_stuff164k", {
        "train": [(f"images/train2017/00000000000{i}.jpg",
                   f"annotations/train2017/00000000000{i}_labelTrainIds.png") for i in (9, 8)],
        "val": [("images/val2017/000000000139.jpg",
                 "annotations/val2017/000000000139_labelTrainIds.png")]}
  if name == "pascal_context59":
    return "VOCdevkit/VOC2010", {
        "train": [(f"JPEGImages/2008_00000{i}.jpg", f"SegmentationClassContext/2008_00000{i}.png")
                  for i in (2, 3)],
        "val": [("JPEGImages/2008_000009.jpg", "SegmentationClassContext/2008_000009.png")]}
  if name == "bdd100k":
    return "bdd100k", {
        "train": [(f"images/10k/train/0a0a0b1a-7c39d84{i}.jpg",
                   f"labels/sem_seg/masks/train/0a0a0b1a-7c39d84{i}.png") for i in (1, 2)],
        "val": [("images/10k/val/7d2f7975-e0c1c5a7.jpg",
                 "labels/sem_seg/masks/val/7d2f7975-e0c1c5a7.png")]}
  assert name == "custom"
  return "mydata", {"train": [("img_dir/train/a.jpg", "ann_dir/train/a.png"),
                              ("img_dir/train/b.jpg", "ann_dir/train/b.png")],
                    "val": [("img_dir/val/c.jpg", "ann_dir/val/c.png")]}


# Stored label values: (max raw value, reduce_zero_label).
_LABEL_RANGE = {"ade20k": (150, True), "cityscapes": (18, False), "coco_stuff164k": (170, False),
                "pascal_context59": (59, True), "bdd100k": (18, False), "custom": (2, False)}


def _make_dataset(tmp_path, name, seed=0):
  """Writes the fake dataset; returns (config, data root, written files)."""
  rng = np.random.default_rng(seed)
  sub, splits = _layout(name)
  root = tmp_path / sub
  top, _ = _LABEL_RANGE[name]
  written = {}
  for split, pairs in splits.items():
    for k, (image_rel, label_rel) in enumerate(pairs):
      h, w = 40 + 8 * k, 64 + 8 * k
      label = rng.integers(0, top + 1, (h, w)).astype(np.uint8)
      label[0, :4] = 255
      _write(root / image_rel, _photo(rng, h, w))
      _write(root / label_rel, label)
      written.setdefault(split, []).append((root / image_rel, root / label_rel))
  if name == "cityscapes":   # the converter's input must not be mistaken for labels
    _write(root / "gtFine/train/aachen/aachen_000000_000019_gtFine_labelIds.png",
           np.zeros((40, 64), np.uint8))
  if name == "pascal_context59":
    _write(root / "JPEGImages/2008_000099.jpg", _photo(rng, 40, 64))   # in no split
    os.makedirs(root / "ImageSets/SegmentationContext")
    for split, files in written.items():
      (root / f"ImageSets/SegmentationContext/{split}.txt").write_text(
          "\n".join(p[0].stem for p in files) + "\n")
  config = datasets.default_data_config(name)
  # Point one level up where the standard layout allows it (ADE, Pascal Context).
  config.root = str(root.parent if name in ("ade20k", "pascal_context59") else root)
  if name == "custom":
    config.class_names = ("sky", "road", "car")
  return config, root, written


@pytest.mark.parametrize("name", ["ade20k", "cityscapes", "coco_stuff164k", "pascal_context59",
                                  "bdd100k", "custom"])
def test_layout_loads_augments_and_batches(tmp_path, name):
  config, _, written = _make_dataset(tmp_path, name)
  info = datasets.dataset_info(config)
  top, reduce = _LABEL_RANGE[name]
  assert info.num_classes == top + (0 if reduce else 1) and info.reduce_zero_label == reduce
  for split, files in written.items():
    source = datasets.build_source(config, split)
    assert len(source) == len(files)
    for example, (image_path, label_path) in zip((source[i] for i in range(len(source))),
                                                 sorted(files)):
      stored = cv2.imread(str(label_path), cv2.IMREAD_UNCHANGED)
      expected = stored
      if reduce:
        expected = np.where(stored == 0, 255, stored.astype(int) - 1)
        expected[stored == 255] = 255
      np.testing.assert_array_equal(example["label"], expected)
      np.testing.assert_array_equal(example["image"], cv2.imread(str(image_path))[..., ::-1])
      assert example["name"] in str(image_path)
  # Augment and batch through grain, as the loader does.
  config.crop_size, config.train_scale = (24, 32), (96, 40)
  source = datasets.build_source(config, "train")
  dataset = (grain.MapDataset.source(source)
             .random_map(transforms.build_train_transform(config), seed=0)
             .map(transforms.build_train_finalize(config)).batch(2, drop_remainder=True))
  batch = next(iter(dataset.to_iter_dataset(grain.ReadOptions(num_threads=2,
                                                                prefetch_buffer_size=2))))
  assert batch["image"].shape == (2, 24, 32, 3) and batch["image"].dtype == np.float32
  assert batch["label"].shape == (2, 24, 32)
  assert set(np.unique(batch["label"])) <= set(range(info.num_classes)) | {255}


def test_official_class_counts_and_fixed_conventions():
  expected = {"ade20k": (150, True), "cityscapes": (19, False), "coco_stuff164k": (171, False),
              "pascal_context59": (59, True), "bdd100k": (19, False), "synthetic": (9, False)}
  for name, (k, reduce) in expected.items():
    info = datasets.dataset_info(datasets.default_data_config(name))
    assert (info.num_classes, info.reduce_zero_label) == (k, reduce), name
    assert len(info.class_names) == k and info.palette.shape == (k, 3)
    assert info.palette.dtype == np.uint8 and info.ignore_index == 255
  assert datasets.dataset_info(datasets.default_data_config("ade20k")).class_names[0] == "wall"
  assert datasets.dataset_info(datasets.default_data_config("cityscapes")).class_names[-1] == \
      "bicycle"
  config = datasets.default_data_config("ade20k")
  config.reduce_zero_label = False
  with pytest.raises(ValueError, match="fixed to True"):
    datasets.dataset_info(config)
  config = datasets.default_data_config("custom")
  with pytest.raises(ValueError, match="class_names"):
    datasets.dataset_info(config)
  config.class_names, config.ignore_index = ("a", "b"), 0
  with pytest.raises(ValueError, match="only 255"):
    datasets.dataset_info(config)


def test_default_configs_share_every_field_and_official_recipes():
  names = sorted(datasets.DATASETS)
  keys = {n: set(datasets.default_data_config(n).to_dict()) for n in names}
  assert all(k == keys["ade20k"] for k in keys.values())
  assert {"name", "root", "crop_size", "flip_prob", "mean", "std", "ignore_index", "image_size",
          "num_train", "num_val", "seed", "num_threads", "prefetch"} <= keys["ade20k"]
  recipes = {n: (c.crop_size, c.train_scale, c.test_scale) for n in names
             for c in [datasets.default_data_config(n)]}
  assert recipes["ade20k"] == ((512, 512), (2048, 512), (2048, 512))
  assert recipes["cityscapes"] == ((1024, 1024), (2048, 1024), (2048, 1024))
  assert recipes["pascal_context59"] == ((480, 480), (520, 520), (520, 520))
  assert recipes["synthetic"] == ((64, 64), (), ())
  synthetic_config = datasets.default_data_config("synthetic")
  assert not synthetic_config.photometric and synthetic_config.flip_prob == 0.5
  locked = ml_collections.ConfigDict({"data": datasets.default_data_config("ade20k")})
  locked.lock()
  with pytest.raises(AttributeError):
    locked.data.not_a_field = 1


def test_synthetic_source_unchanged():
  config = datasets.default_data_config("synthetic")
  source = datasets.build_source(config, "val")
  direct = synthetic.SyntheticSource(split="val", num_examples=512, image_size=64, seed=0)
  assert len(source) == 512
  for i in (0, 7):
    np.testing.assert_array_equal(source[i]["image"], direct[i]["image"])
    np.testing.assert_array_equal(source[i]["label"], direct[i]["label"])


def test_wrong_root_or_layout_says_what_was_expected(tmp_path):
  config = datasets.default_data_config("ade20k")
  config.root = str(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError, match=r"does not exist.*images/training"):
    datasets.build_source(config, "train")
  (tmp_path / "ade" / "images").mkdir(parents=True)
  config.root = str(tmp_path / "ade")
  with pytest.raises(FileNotFoundError, match=r"images/training not found.*ADE20K layout"):
    datasets.build_source(config, "train")
  config, _, _ = _make_dataset(tmp_path / "c", "cityscapes")
  config.img_suffix = ".jpg"
  with pytest.raises(FileNotFoundError, match=r"no '\*\.jpg' images"):
    datasets.build_source(config, "train")


def _custom(tmp_path, **overrides):
  config, root, written = _make_dataset(tmp_path, "custom")
  for k, v in overrides.items():
    config[k] = v
  return config, root, written


def test_unpaired_image_is_an_error_or_skipped_and_reported(tmp_path):
  config, root, written = _custom(tmp_path)
  os.remove(written["train"][0][1])
  with pytest.raises(image_io.BadFileError, match=r"a\.jpg: no label file .*ann_dir/train/a\.png"):
    datasets.build_source(config, "train")
  config.skip_bad_files = True
  source = datasets.build_source(config, "train")
  assert len(source) == 1 and source[0]["name"] == "b"
  assert [e.path for e in source.bad_files.errors] == [str(root / "img_dir/train/a.jpg")]


@pytest.mark.parametrize("problem, kind, match", [
    ("truncated", image_io.TRUNCATED, r"b\.jpg: truncated JPEG"),
    ("rgb_label", image_io.RGB_LABEL, r"b\.png: label is a 3-channel colour image"),
    ("label_values", image_io.LABEL_VALUES, r"b\.png: .* values 7 outside the 3 classes"),
    ("size", image_io.SIZE_MISMATCH, r"b\.png: label size 10x10 .*differs from image"),
    ("garbage", image_io.UNREADABLE, r"b\.png: cannot decode"),
])
def test_bad_files_name_the_file(tmp_path, problem, kind, match):
  config, _, written = _custom(tmp_path)
  image_path, label_path = written["train"][1]
  if problem == "truncated":
    image_path.write_bytes(image_path.read_bytes()[:300])
  elif problem == "rgb_label":
    _write(label_path, np.zeros((48, 72, 3), np.uint8) + [0, 1, 2])
  elif problem == "label_values":
    label = cv2.imread(str(label_path), cv2.IMREAD_UNCHANGED)
    label[5, 5] = 7
    _write(label_path, label)
  elif problem == "size":
    _write(label_path, np.zeros((10, 10), np.uint8))
  else:
    label_path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20 + b"IEND....")
  source = datasets.build_source(config, "train")
  assert source[0]["name"] == "a"
  with pytest.raises(image_io.BadFileError, match=match) as error:
    source[1]
  assert error.value.kind == kind
  # skip_bad_files: replaced by the next usable example, recorded once per file.
  config.skip_bad_files = True
  source = datasets.build_source(config, "train")
  assert source[1]["name"] == "a" and source[1]["name"] == "a"
  assert len(source.bad_files) == 1 and source.bad_files.total_hits == 2
  assert source.bad_files.errors[0].kind == kind and "1 files" in source.bad_files.summary()


def test_reduce_zero_label_values_and_errors_mention_stored_values(tmp_path):
  config, _, written = _make_dataset(tmp_path, "ade20k")
  label_path = written["train"][0][1]
  label = np.array([[0, 1, 150, 255]], np.uint8).repeat(40, 0).repeat(16, 1)
  _write(label_path, label)
  source = datasets.build_source(config, "train")
  np.testing.assert_array_equal(source[0]["label"][0, ::16], [255, 0, 149, 255])
  label[3, 3] = 151
  _write(label_path, label)
  with pytest.raises(image_io.BadFileError, match=r"values 150 outside .*stored values 151"):
    source[0]


def test_label_decoding_palette_low_bit_depth_and_16_bit(tmp_path):
  from PIL import Image
  label = np.random.default_rng(0).integers(0, 3, (20, 30)).astype(np.uint8)
  palette_png = tmp_path / "p.png"
  image = Image.fromarray(label, "P")
  image.putpalette([0, 0, 0, 200, 10, 10, 10, 200, 10] + [0] * 759)
  image.save(palette_png)
  np.testing.assert_array_equal(
      image_io.decode_label(palette_png.read_bytes(), "p.png"), label)    # indices, not colours
  one_bit = tmp_path / "b.png"
  Image.fromarray(label > 0).save(one_bit)
  np.testing.assert_array_equal(image_io.decode_label(one_bit.read_bytes(), "b.png"),
                                (label > 0).astype(np.uint8))           # 1, not 255
  sixteen = tmp_path / "s.png"
  cv2.imwrite(str(sixteen), label.astype(np.uint16) * 100)
  np.testing.assert_array_equal(image_io.decode_label(sixteen.read_bytes(), "s.png"), label * 100)
  cv2.imwrite(str(sixteen), label.astype(np.uint16) * 1000)
  with pytest.raises(image_io.BadFileError, match="s.png: label values must be 0..255"):
    image_io.decode_label(sixteen.read_bytes(), "s.png")


def test_truncated_jpeg_detection_ignores_thumbnails_and_trailing_bytes():
  jpeg = cv2.imencode(".jpg", np.zeros((16, 16, 3), np.uint8))[1].tobytes()
  assert image_io.truncation_problem(jpeg) is None
  assert image_io.truncation_problem(jpeg + b"\x00" * 10) is None
  # An APP1 segment holding a complete thumbnail (with its own end marker).
  app1 = b"\xff\xe1" + (len(jpeg) + 2).to_bytes(2, "big") + jpeg
  with_thumbnail = jpeg[:2] + app1 + jpeg[2:]
  assert image_io.truncation_problem(with_thumbnail) is None
  assert "truncated JPEG" in image_io.truncation_problem(with_thumbnail[:-40])
  assert image_io.decode_image(with_thumbnail, "t.jpg").shape == (16, 16, 3)


# ---------------------------------------------------------------- choosing a dataset


def test_a_name_the_config_was_not_made_for_is_refused_with_the_config_to_use():
  config = datasets.default_data_config("synthetic")
  config.name, config.root = "ade20k", "ADE"
  for call in (datasets.dataset_info, lambda c: datasets.build_source(c, "train"),
               lambda c: datasets.folder_listing(c, "train")):
    with pytest.raises(ValueError, match=r"^data.name='ade20k' .* made for 'synthetic'; .*"
                       r"--config=experiments/configs/offseg.py:t,ade20k "
                       r"--config.data.root=ADE$"):
      call(config)
  config = datasets.default_data_config("ade20k")
  config.name = "cityscapes"
  with pytest.raises(ValueError, match=r"made for 'ade20k'.*offseg.py:t,cityscapes"):
    datasets.dataset_info(config)
  config.name = "bdd100k"
  with pytest.raises(ValueError, match=r"common.data_config\('bdd100k'\)"):
    datasets.dataset_info(config)
  # The synthetic recipe (64-pixel crops, no resize) and sizes fit no real data.
  config = datasets.default_data_config("synthetic")
  config.name, config.class_names = "custom", ("a", "b")
  with pytest.raises(ValueError, match=r"made for 'synthetic'.*offseg.py:t,ade20k "
                     r"--config.data.name=custom"):
    datasets.dataset_info(config)


@pytest.mark.parametrize("name", sorted(dataset_config.EXPERIMENT_CONFIGS))
def test_the_configs_the_refusal_names_are_made_for_their_dataset(name):
  path, _, arg = dataset_config.EXPERIMENT_CONFIGS[name].partition(":")
  module = importlib.import_module(path[:-len(".py")].replace("/", "."))
  config = module.get_config(arg or None)
  assert config.data.name == config.data.defaults_for == name


def test_own_folders_with_a_real_datasets_recipe_get_the_custom_layout(tmp_path):
  _, root, written = _make_dataset(tmp_path, "custom")
  config = datasets.default_data_config("ade20k")     # e.g. from offseg.py:t,ade20k
  config.name, config.root, config.class_names = "custom", str(root), ("sky", "road", "car")
  source = datasets.build_source(config, "train")     # img_dir/train, not images/training
  assert len(source) == len(written["train"]) and source[0]["name"] == "a"
  assert datasets.dataset_info(config).num_classes == 3
  assert config.crop_size == (512, 512) and config.img_dir == "images/{split}"  # not edited
  config.img_dir = "photos/{split}"                   # set explicitly: kept
  with pytest.raises(FileNotFoundError, match=r"photos/train not found"):
    datasets.build_source(config, "train")


@pytest.mark.parametrize("name, layout", [
    ("ade20k", "the ADE20K layout (images/training/**/*.jpg, annotations/training/**/*.png)"),
    ("cityscapes", "the Cityscapes layout (leftImg8bit/train/**/*_leftImg8bit.png, "
                   "gtFine/train/**/*_gtFine_labelTrainIds.png)"),
    ("coco_stuff164k", "the COCO-Stuff-164k layout (images/train2017/**/*.jpg, "
                       "annotations/train2017/**/*_labelTrainIds.png)"),
    ("pascal_context59", "the Pascal-Context-59 layout (JPEGImages/**/*.jpg, "
                         "SegmentationClassContext/**/*.png, "
                         "ImageSets/SegmentationContext/train.txt)"),
    ("bdd100k", "the BDD100K layout (images/10k/train/**/*.jpg, "
                "labels/sem_seg/masks/train/**/*.png)"),
])
def test_layout_messages_describe_the_real_layout(tmp_path, name, layout):
  config = datasets.default_data_config(name)
  config.root = str(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError) as error:
    datasets.build_source(config, "train")
  assert layout in str(error.value)
  config.root = str(tmp_path)
  with pytest.raises(FileNotFoundError) as error:
    datasets.build_source(config, "train")
  assert layout in str(error.value)
  config.img_suffix = ".tif"          # a changed layout is named as such, with the real one
  title, files = layout[len("the "):-1].split(" layout (")
  with pytest.raises(FileNotFoundError, match=r"\*\.tif.* as configured .*" +
                     re.escape(f"(the {title} layout is {files})")):
    datasets.build_source(config, "train")


def test_choosing_a_dataset_on_the_command_line_as_a_user_would(tmp_path):
  """The trap: the default config with only data.name changed, then the suggestion."""
  config, root, _ = _make_dataset(tmp_path, "ade20k")
  env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
  run = lambda *args: subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env,
                                     capture_output=True, text=True, timeout=180)
  result = run("offseg_jax.main", "--config=experiments/configs/default.py",
               "--config.data.name=ade20k", f"--config.data.root={root}",
               f"--workdir={tmp_path / 'workdir'}")
  assert result.returncode == 2, result.stderr[-2000:]
  errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and "Traceback" not in result.stderr
  assert not (tmp_path / "workdir").exists()
  suggested = errors[0].split("instead: ", 1)[1].split()
  assert suggested == ["--config=experiments/configs/offseg.py:t,ade20k",
                       f"--config.data.root={root}"]
  result = run("input_pipeline.check", *suggested, "--nohistogram")
  assert result.returncode == 0, result.stdout[-2000:]
  assert "== ade20k / train: 2 examples checked, 0 problems" in result.stdout
