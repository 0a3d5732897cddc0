"""mmseg IoUMetric parity (shared fixture) and confusion-matrix accumulation."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from offseg_jax.evaluation import metrics
from offseg_jax.registry import METRICS

PER_CLASS = ("IoU", "Acc", "Dice", "Fscore", "Precision", "Recall")
SUMMARY = ("aAcc", "mIoU", "mAcc", "mDice", "mFscore", "mPrecision", "mRecall")


@pytest.fixture(scope="module")
def fixture(shared_dir):
  npz_path = shared_dir / "parity" / "metrics_iou_ade.npz"
  json_path = shared_dir / "parity" / "metrics_iou_ade.json"
  if not npz_path.exists():
    pytest.skip(f"metric fixture missing at {npz_path}")
  with np.load(npz_path) as data:
    arrays = {k: data[k] for k in data.files}
  return arrays, json.loads(json_path.read_text()), npz_path, json_path


def _fixture_confusion(arrays, spec):
  k = spec["num_classes"]
  n = sum(1 for key in arrays if key.startswith("pred/"))
  return sum(metrics.confusion_matrix_np(arrays[f"pred/{i}"], arrays[f"label/{i}"], k,
                                         spec["ignore_index"]) for i in range(n))


@pytest.mark.parametrize("nan_to_num", [None, 0])
def test_matches_mmseg_iou_metric_fixture(fixture, nan_to_num):
  arrays, spec, _, _ = fixture
  prefix = "" if nan_to_num is None else "nan_to_num_0/"
  confusion = _fixture_confusion(arrays, spec)
  intersect, union, pred_area, label_area = metrics.areas_from_confusion(confusion)
  np.testing.assert_array_equal(intersect, arrays["total/intersect"])
  np.testing.assert_array_equal(union, arrays["total/union"])
  np.testing.assert_array_equal(pred_area, arrays["total/pred_label"])
  np.testing.assert_array_equal(label_area, arrays["total/label"])

  per = metrics.per_class_metrics(confusion, metrics.ALL_METRICS, nan_to_num=nan_to_num)
  for key in PER_CLASS:
    ref = arrays[prefix + "per_class/" + key]
    np.testing.assert_array_equal(np.isnan(per[key]), np.isnan(ref), err_msg=key)
    np.testing.assert_allclose(per[key], ref, rtol=1e-6, err_msg=key)   # NaNs compare equal
  np.testing.assert_allclose(per["aAcc"], arrays[prefix + "overall/aAcc"][0], rtol=1e-6)

  names = [f"class_{i}" for i in range(spec["num_classes"])]
  summary = metrics.summarize(confusion, names, metrics.ALL_METRICS, nan_to_num=nan_to_num)
  for key in SUMMARY:
    assert abs(summary[key] - float(arrays[prefix + "summary/" + key][0])) <= 0.01, key
    # The JSON records the reported values too.
    assert abs(summary[key] - spec["results"][str(nan_to_num)]["summary"][key]) <= 0.01, key
  for key in PER_CLASS:
    table = np.array([summary["per_class"][n][key] for n in names])
    np.testing.assert_allclose(table, arrays[prefix + "table/" + key], atol=1e-9, err_msg=key)


def test_nan_classes_are_those_of_the_fixture(fixture):
  arrays, spec, _, _ = fixture
  per = metrics.per_class_metrics(_fixture_confusion(arrays, spec), metrics.ALL_METRICS)
  for key, classes in spec["results"]["None"]["nan_classes"].items():
    assert np.flatnonzero(np.isnan(per[key])).tolist() == classes, key


def test_parity_entry_point_and_registry(fixture):
  _, spec, npz_path, json_path = fixture
  errors = metrics.iou_metric_from_fixture(npz_path, json_path)
  per_class = {k: v for k, v in errors.items() if "per_class/" in k or "overall/" in k}
  summaries = {k: v for k, v in errors.items() if "summary/" in k}
  assert len(per_class) == 2 * (len(PER_CLASS) + 1)
  assert len(summaries) == 2 * len(SUMMARY)
  assert max(per_class.values()) < 1e-6, per_class
  assert max(summaries.values()) <= 0.01, summaries
  assert max(v for k, v in errors.items() if k.startswith("total/")) == 0
  # The parity tool finds the metric by its fixture's build name.
  entry = METRICS.get(spec["parity"]["build"])
  metric = entry.from_official(spec["metric_args"], spec["num_classes"])
  assert metric.iou_metrics == tuple(spec["metric_args"]["iou_metrics"])


def test_parity_errors_expose_a_wrong_metric(fixture):
  arrays, spec, _, json_path = fixture
  broken = dict(arrays)
  broken["pred/0"] = np.where(arrays["pred/0"] == 3, 4, arrays["pred/0"]).astype(np.uint8)
  errors = metrics.iou_metric_from_fixture(broken, json_path)
  assert errors["per_class/IoU"] > 1e-3 or np.isinf(errors["per_class/IoU"])


def test_iou_metric_accumulates_images_like_one_big_image():
  rng = np.random.default_rng(0)
  preds = [rng.integers(0, 5, (7, 9)) for _ in range(3)]
  labels = [np.where(rng.random((7, 9)) < 0.2, 255, rng.integers(0, 5, (7, 9))) for _ in range(3)]
  metric = metrics.IoUMetric(5, class_names=list("abcde"), iou_metrics=("mIoU", "mFscore"))
  for p, l in zip(preds, labels):
    metric.process(p, l)
  whole = metrics.confusion_matrix_np(np.concatenate(preds), np.concatenate(labels), 5)
  np.testing.assert_array_equal(metric.confusion, whole)
  assert metric.num_images == 3
  summary = metric.compute()
  assert set(summary["per_class"]) == set("abcde")
  assert {"aAcc", "mIoU", "mAcc", "mFscore", "mPrecision", "mRecall"} <= set(summary)


def test_jitted_confusion_matches_numpy_and_skips_ignored_and_masked():
  rng = np.random.default_rng(1)
  pred = rng.integers(0, 6, (2, 11, 13))
  label = rng.integers(0, 6, (2, 11, 13))
  label[0, :3] = 255
  label[1, 0, 0] = 7                                  # out of range: not counted
  jitted = jax.jit(metrics.confusion_matrix, static_argnums=(2, 3))
  got = np.asarray(jitted(jnp.asarray(pred), jnp.asarray(label), 6, 255))
  want = metrics.confusion_matrix_np(pred, label, 6)
  np.testing.assert_array_equal(got, want)
  assert got.sum() == (label < 6).sum()
  masked = metrics.confusion_matrix(pred, label, 6, valid=jnp.array([True, False])[:, None, None])
  np.testing.assert_array_equal(masked, metrics.confusion_matrix_np(pred[:1], label[:1], 6))


def test_int64_totals_do_not_overflow():
  # A Cityscapes val pass has ~1e9 labelled pixels; counts beyond int32 stay exact.
  confusion = np.array([[3_000_000_000, 1], [2, 2_500_000_000]], np.int64)
  metric = metrics.IoUMetric(2)
  metric.add(confusion)
  metric.add(confusion)
  summary = metric.compute()
  assert metric.confusion[0, 0] == 6_000_000_000
  assert summary["mIoU"] == pytest.approx(100.0, abs=0.01)
  np.testing.assert_array_equal(metrics.process_sum(metric.confusion), metric.confusion)


def test_absent_classes_are_nan_and_skipped_unless_nan_to_num():
  confusion = np.zeros((3, 3), np.int64)
  confusion[0, 0], confusion[0, 1], confusion[1, 1] = 8, 2, 6     # class 2 absent everywhere
  summary = metrics.summarize(confusion, ["a", "b", "c"])
  assert np.isnan(summary["per_class"]["c"]["IoU"])
  assert summary["mIoU"] == pytest.approx(100 * (0.8 + 6 / 8) / 2, abs=0.01)
  zero = metrics.summarize(confusion, ["a", "b", "c"], nan_to_num=0)
  assert zero["per_class"]["c"]["IoU"] == 0.0
  assert zero["mIoU"] == pytest.approx(100 * (0.8 + 6 / 8) / 3, abs=0.01)
  table = metrics.format_table(summary)
  assert "c" in table and "nan" in table and "mIoU" in table
