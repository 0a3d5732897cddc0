"""Storage: every user path goes through ``etils.epath``, so ``gs://`` works wherever a
local path does.

* A static scan (``ast``) of ``offseg_jax/`` and ``input_pipeline/`` for local-only
  file calls (builtin ``open``, ``os.path``, ``os.makedirs``, ``shutil``, ``pathlib``,
  ``glob.glob``, ``cv2.imread``/``imwrite``, ``np.save``/``np.load``/``Image.open``
  on a path instead of a file object, ...), with a short justified allow-list.
* A fake remote file system: ``gs://fake-bucket/...`` served from a temporary
  folder through ``etils.epath.testing.mock_epath`` (epath's gs backend replaced),
  on which a folder dataset is read, a converted checkpoint written and read
  back, and the evaluation report written. Code that bypassed epath would look
  for a local folder named ``gs:`` and fail (the tests also check none was made).
"""

from __future__ import annotations

import ast
import contextlib
import json
import os
import re
from pathlib import Path
from unittest import mock

import cv2
import numpy as np
import pytest
from etils import epath
from etils.epath import gpath as epath_gpath

from input_pipeline import datasets, image_io, storage

REPO = Path(__file__).resolve().parents[1]
SCANNED = ("offseg_jax", "input_pipeline")

# ---------------------------------------------------------------------------
# Static scan
# ---------------------------------------------------------------------------

# Calls that touch the local file system whatever their arguments.
_LOCAL_ONLY_CALLS = {
    "open", "io.open", "codecs.open",
    "glob.glob", "glob.iglob",
    "cv2.imread", "cv2.imwrite", "cv2.imreadmulti", "cv2.imwritemulti",
    "numpy.fromfile",
} | {f"os.{name}" for name in (
    "makedirs", "listdir", "remove", "replace", "rename", "walk", "scandir", "mkdir",
    "rmdir", "unlink", "removedirs", "stat", "lstat", "symlink", "link", "truncate",
    "chmod", "utime")}
# Modules of which any use is local-only.
_LOCAL_ONLY_MODULES = ("os.path", "shutil", "pathlib")
# Calls whose first argument must be a file object (opened through epath, or an
# in-memory buffer), not a path.
_FILE_OBJECT_ARG = {
    "numpy.save", "numpy.savez", "numpy.savez_compressed", "numpy.load", "numpy.loadtxt",
    "numpy.savetxt", "numpy.genfromtxt", "PIL.Image.open", "zipfile.ZipFile",
    "zipfile.is_zipfile", "torch.load",
}
# Method calls whose first argument must be a file object: matplotlib's
# ``fig.savefig`` and PIL's ``image.save`` (receiver made by ``PIL.Image.*``).
_FILE_OBJECT_METHODS = ("savefig",)
_FILE_ANNOTATION = re.compile(r"\b(IO|BinaryIO|TextIO|BytesIO|IOBase|BufferedIOBase)\b")
_IN_MEMORY = {"io.BytesIO", "io.StringIO", "tempfile.TemporaryFile",
              "tempfile.NamedTemporaryFile", "tempfile.SpooledTemporaryFile"}

# (file, call) -> why it may stay.
ALLOWED = {
}


def _qualified(node: ast.AST, aliases: dict[str, str]) -> str | None:
  """``np.load`` -> ``numpy.load`` through the module's imports; None if not a name."""
  if isinstance(node, ast.Name):
    return aliases.get(node.id, node.id)
  if isinstance(node, ast.Attribute):
    base = _qualified(node.value, aliases)
    return None if base is None else f"{base}.{node.attr}"
  return None


class _Scanner(ast.NodeVisitor):
  """Collects ``(line, what)`` of local-only file calls in one module."""

  def __init__(self, tree: ast.Module):
    self.aliases: dict[str, str] = {}
    self.defined: set[str] = set()      # module-level names shadowing builtins (open)
    self.found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        for a in node.names:
          self.aliases[(a.asname or a.name).split(".")[0]] = (
              a.name if a.asname else a.name.split(".")[0])
          self._check_module(node, a.name)
      elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
        for a in node.names:
          self.aliases[a.asname or a.name] = f"{node.module}.{a.name}"
          self._check_module(node, f"{node.module}.{a.name}")
    for node in tree.body:
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        self.defined.add(node.name)
    self.scopes: list[set[str]] = [self._file_objects(tree)]
    self.images = self._pil_images(tree)

  def _check_module(self, node, name: str):
    for module in _LOCAL_ONLY_MODULES:
      if name == module or name.startswith(module + "."):
        self.found.append((node.lineno, f"import {name}"))
    if name in _LOCAL_ONLY_CALLS:                 # from os import makedirs, ...
      self.found.append((node.lineno, f"import {name}"))

  # -- which names hold file objects ----------------------------------------------

  def _is_file_object(self, node: ast.AST, names: set[str]) -> bool:
    if isinstance(node, ast.Name):
      return node.id in names
    if isinstance(node, ast.Call):
      q = _qualified(node.func, self.aliases)
      if q in _IN_MEMORY:
        return True
      # ``<epath>.open(...)``: any ``.open`` method but PIL's (which returns an image).
      return (isinstance(node.func, ast.Attribute) and node.func.attr == "open"
              and q != "PIL.Image.open")
    return False

  def _file_objects(self, scope: ast.AST) -> set[str]:
    names: set[str] = set()
    if isinstance(scope, (ast.FunctionDef, ast.AsyncFunctionDef)):
      # Parameters annotated as file objects (``file: BinaryIO``).
      params = scope.args.posonlyargs + scope.args.args + scope.args.kwonlyargs
      names |= {a.arg for a in params
                if a.annotation is not None and _FILE_ANNOTATION.search(ast.unparse(a.annotation))}
    for _ in range(2):     # a name assigned from another file-object name
      for node in ast.walk(scope):
        if isinstance(node, (ast.With, ast.AsyncWith)):
          for item in node.items:
            if (isinstance(item.optional_vars, ast.Name)
                and self._is_file_object(item.context_expr, names)):
              names.add(item.optional_vars.id)
        elif (isinstance(node, ast.Assign) and len(node.targets) == 1
              and isinstance(node.targets[0], ast.Name)
              and self._is_file_object(node.value, names)):
          names.add(node.targets[0].id)
    return names

  def _pil_images(self, scope: ast.AST) -> set[str]:
    return {node.targets[0].id for node in ast.walk(scope)
            if isinstance(node, ast.Assign) and len(node.targets) == 1
            and isinstance(node.targets[0], ast.Name) and isinstance(node.value, ast.Call)
            and (_qualified(node.value.func, self.aliases) or "").startswith("PIL.Image.")}

  def _visit_scope(self, node):
    self.scopes.append(self._file_objects(node) | self.scopes[-1])
    self.generic_visit(node)
    self.scopes.pop()

  visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _visit_scope

  # -- the checks -------------------------------------------------------------------

  def visit_Attribute(self, node: ast.Attribute):
    q = _qualified(node, self.aliases)
    if q and any(q.startswith(m + ".") for m in _LOCAL_ONLY_MODULES):
      self.found.append((node.lineno, q))
      return                     # os.path.join: reported once, not again for os.path
    self.generic_visit(node)

  def visit_Call(self, node: ast.Call):
    q = _qualified(node.func, self.aliases)
    if q == "open" and "open" in self.defined:
      q = None
    if q in _LOCAL_ONLY_CALLS:
      self.found.append((node.lineno, q))
    first = node.args[0] if node.args else None
    needs_file = q in _FILE_OBJECT_ARG
    if isinstance(node.func, ast.Attribute) and not needs_file:
      receiver = node.func.value
      if node.func.attr in _FILE_OBJECT_METHODS:
        needs_file, q = True, f"<figure>.{node.func.attr}"
      elif node.func.attr == "save" and (
          (isinstance(receiver, ast.Call)
           and (_qualified(receiver.func, self.aliases) or "").startswith("PIL.Image."))
          or (isinstance(receiver, ast.Name) and receiver.id in self.images)):
        needs_file, q = True, "<PIL image>.save"
      elif node.func.attr == "tofile":
        self.found.append((node.lineno, "<ndarray>.tofile"))
    if needs_file and not (first is not None and self._is_file_object(first, self.scopes[-1])):
      self.found.append((node.lineno, f"{q}(<path>)"))
    self.generic_visit(node)


def scan_file(path: Path) -> list[tuple[int, str]]:
  tree = ast.parse(path.read_text(), str(path))
  scanner = _Scanner(tree)
  scanner.visit(tree)
  return sorted(set(scanner.found))


def scan_repo() -> dict[str, list[tuple[int, str]]]:
  out = {}
  for top in SCANNED:
    for path in sorted((REPO / top).rglob("*.py")):
      found = scan_file(path)
      if found:
        out[path.relative_to(REPO).as_posix()] = found
  return out


def _call_name(what: str) -> str:
  return what.removesuffix("(<path>)").removeprefix("import ")


def test_no_local_only_file_calls_on_user_paths():
  problems = [f"{rel}:{line}: {what}" for rel, found in scan_repo().items()
              for line, what in found if (rel, _call_name(what)) not in ALLOWED]
  assert not problems, (
      "local-only file calls (use etils.epath: epath.Path(p).open/read_bytes/write_text/"
      "mkdir/glob/iterdir/exists/is_dir, input_pipeline.storage.walk/join/absolute, "
      "cv2.imdecode/imencode on bytes, np.save/np.load/Image.open on epath file objects):\n"
      + "\n".join(problems))


def test_allow_list_entries_are_still_needed():
  used = {(rel, _call_name(what)) for rel, found in scan_repo().items() for _, what in found}
  stale = sorted(set(ALLOWED) - used)
  assert not stale, f"allow-list entries that no longer match anything (remove them): {stale}"


def test_the_scan_finds_each_kind_of_local_call(tmp_path):
  """The checker itself: each banned form is reported, the epath forms are not."""
  bad = tmp_path / "bad.py"
  bad.write_text('''
import os, glob, shutil, pathlib
import numpy as np
import cv2
from PIL import Image
from os import path as osp
def f(p, q):
  open(p)
  os.path.join(p, "x")
  os.makedirs(p)
  os.listdir(p); os.remove(p); os.replace(p, q); os.rename(p, q)
  shutil.rmtree(p)
  glob.glob(p)
  cv2.imread(p); cv2.imwrite(p, q)
  np.save(p, q); np.load(p)
  Image.open(p)
  Image.fromarray(q).save(p)
  image = Image.fromarray(q)
  image.save(p)
  handle = io.BytesIO(p) if q else p
  Image.open(handle)
''')
  found = [what for _, what in scan_file(bad)]
  for expected in ("import shutil", "import pathlib", "import os.path", "open", "os.path.join",
                   "os.makedirs", "os.listdir", "os.remove", "os.replace", "os.rename",
                   "shutil.rmtree", "glob.glob", "cv2.imread", "cv2.imwrite",
                   "numpy.save(<path>)", "numpy.load(<path>)", "PIL.Image.open(<path>)",
                   "<PIL image>.save(<path>)"):
    assert expected in found, (expected, found)
  assert found.count("PIL.Image.open(<path>)") == 2
  assert found.count("<PIL image>.save(<path>)") == 2
  good = tmp_path / "good.py"
  good.write_text('''
import io
import numpy as np
from etils import epath
from PIL import Image
def f(p, q):
  with epath.Path(p).open("rb") as fh, np.load(fh) as data:
    pass
  with epath.Path(p).open("wb") as out:
    np.save(out, q)
  with epath.Path(p).open("rb") as fh, Image.open(fh) as image:
    pass
  buffer = io.BytesIO()
  Image.fromarray(q).save(buffer, format="PNG")
  Image.open(io.BytesIO(q))
  epath.Path(p).write_bytes(buffer.getvalue())
''')
  assert scan_file(good) == []


# ---------------------------------------------------------------------------
# A fake gs:// bucket
# ---------------------------------------------------------------------------

BUCKET = "gs://fake-bucket"


class FakeBucket:
  """``gs://fake-bucket/<p>`` served from ``root/<p>``.

  Installed with ``etils.epath.testing.mock_epath``: every epath backend call
  gets its path translated; local paths pass through. Walking returns the
  directories without their ``gs://``, as epath's fsspec (gcsfs) backend does.
  """

  def __init__(self, root: Path):
    self.root = root
    self.calls: list[str] = []          # remote paths epath was asked about

  def local(self, path) -> str:
    path = os.fspath(path)
    if path.startswith(BUCKET + "/") or path == BUCKET:
      self.calls.append(path)
      return str(self.root) + path[len(BUCKET):]
    assert not path.startswith("gs:"), f"mangled remote path {path!r}"
    return path

  def _remote(self, path, stripped: bool = False) -> str:
    rel = os.path.relpath(os.fspath(path), self.root)
    rel = "" if rel == "." else "/" + rel
    return ("fake-bucket" if stripped else BUCKET) + rel

  @contextlib.contextmanager
  def installed(self):
    remote = lambda p: os.fspath(p).startswith(BUCKET)
    one = lambda fn, path, *a, **k: fn(self.local(path), *a, **k)
    two = lambda fn, src, dst, *a, **k: fn(self.local(src), self.local(dst), *a, **k)

    def glob(fn, pattern):
      found = fn(self.local(pattern))
      return [self._remote(p) for p in found] if remote(pattern) else found

    def walk(fn, top, **kwargs):
      for directory, dirs, files in fn(self.local(top), **kwargs):
        yield (self._remote(directory, stripped=True) if remote(top) else directory,
               dirs, files)

    with epath.testing.mock_epath(
        open=one, exists=one, isdir=one, listdir=one, makedirs=one, mkdir=one, remove=one,
        rmtree=one, stat=one, glob=glob, walk=walk, rename=two, replace=two, copy=two), \
        mock.patch.object(epath_gpath, "_is_tf_installed", lambda: False):
      yield self


@pytest.fixture
def bucket(tmp_path, monkeypatch):
  """The fake bucket, installed; the working directory is an empty folder so that a
  path which bypassed epath (a local ``gs:/fake-bucket/...``) is caught."""
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  fake = FakeBucket(tmp_path / "bucket")
  fake.root.mkdir()
  with fake.installed():
    yield fake
  assert not list(cwd.iterdir()), f"files written outside epath: {list(cwd.iterdir())}"


def test_fake_bucket_round_trip(bucket):
  path = epath.Path(f"{BUCKET}/a/b.txt")
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("hello")
  assert (bucket.root / "a" / "b.txt").read_text() == "hello"
  assert path.exists() and path.is_file() and not epath.Path(f"{BUCKET}/a/c").exists()
  assert [os.fspath(p) for p in epath.Path(f"{BUCKET}/a").glob("*.txt")] == [os.fspath(path)]
  assert [(os.fspath(d), r, f) for d, r, f in storage.walk(f"{BUCKET}/a")] == [
      (f"{BUCKET}/a", "", ["b.txt"])]
  assert not os.path.exists("gs:")           # plain os calls do not see the bucket


# ---------------------------------------------------------------------------
# (a) A folder dataset in the bucket
# ---------------------------------------------------------------------------

# name -> (folder below the bucket's data/ that data.root=.../data must find,
#          [(image, label) files of the train split], split file or None)
_LAYOUTS = {
    "ade20k": ("ADEChallengeData2016",
               [(f"images/training/ADE_train_{i:08d}.jpg",
                 f"annotations/training/ADE_train_{i:08d}.png") for i in (1, 2, 3)], None),
    "cityscapes": ("", [(f"leftImg8bit/train/{c}/{c}_000000_000019_leftImg8bit.png",
                         f"gtFine/train/{c}/{c}_000000_000019_gtFine_labelTrainIds.png")
                        for c in ("aachen", "bochum")], None),
    "pascal_context59": ("VOC2010", [(f"JPEGImages/2008_00000{i}.jpg",
                                      f"SegmentationClassContext/2008_00000{i}.png")
                                     for i in (2, 3)],
                         "ImageSets/SegmentationContext/train.txt"),
}


def _write_dataset(data: Path, name: str) -> None:
  sub, pairs, split_file = _LAYOUTS[name]
  rng = np.random.default_rng(0)
  top = 150 if name == "ade20k" else 18
  for k, (image_rel, label_rel) in enumerate(pairs):
    h, w = 24 + 4 * k, 32 + 8 * k
    for rel, array in ((image_rel, rng.integers(0, 256, (h, w, 3), dtype=np.uint8)),
                       (label_rel, rng.integers(0, top + 1, (h, w)).astype(np.uint8))):
      path = data / sub / rel
      path.parent.mkdir(parents=True, exist_ok=True)
      assert cv2.imwrite(str(path), array)
  if split_file:
    (data / sub / split_file).parent.mkdir(parents=True, exist_ok=True)
    (data / sub / split_file).write_text("".join(Path(i).stem + "\n" for i, _ in pairs))


@pytest.mark.parametrize("name", sorted(_LAYOUTS))
def test_folder_dataset_in_a_bucket_reads_like_the_local_copy(bucket, name):
  _write_dataset(bucket.root / "data", name)
  local_config = datasets.default_data_config(name)
  local_config.root = str(bucket.root / "data")
  remote_config = datasets.default_data_config(name)
  remote_config.root = f"{BUCKET}/data"
  local = datasets.build_source(local_config, "train")
  remote = datasets.build_source(remote_config, "train")
  assert len(remote) == len(local) == len(_LAYOUTS[name][1])
  for (name_l, image_l, label_l), (name_r, image_r, label_r) in zip(local.pairs, remote.pairs):
    assert name_r == name_l
    assert image_r == BUCKET + image_l[len(str(bucket.root)):]
    assert label_r == BUCKET + label_l[len(str(bucket.root)):]
  for i in range(len(local)):
    a, b = local[i], remote[i]
    assert a["name"] == b["name"]
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])
  assert any(c.endswith((".jpg", ".png")) for c in bucket.calls)   # read through epath


def test_bucket_errors_name_the_remote_files(bucket):
  _write_dataset(bucket.root / "data", "ade20k")
  config = datasets.default_data_config("ade20k")
  config.root = f"{BUCKET}/nowhere"
  with pytest.raises(FileNotFoundError, match=r"data.root='gs://fake-bucket/nowhere' does "
                     r"not exist.*images/training"):
    datasets.build_source(config, "train")
  config.root = f"{BUCKET}/data"
  config.img_suffix = ".tif"
  with pytest.raises(FileNotFoundError, match=r"no '\*\.tif' images in gs://fake-bucket/data/"
                     r"ADEChallengeData2016/images/training"):
    datasets.build_source(config, "train")
  with pytest.raises(image_io.BadFileError, match=r"^gs://fake-bucket/x\.png: file does not "
                     r"exist$") as error:
    image_io.read_bytes(f"{BUCKET}/x.png")
  assert error.value.kind == image_io.MISSING
  with pytest.raises(OSError, match=r"^gs://fake-bucket/out/label\.png: cannot write$"):
    image_io.write_image(f"{BUCKET}/out/label.png", np.full((4, 6), 7, np.uint8))  # no out/
  epath.Path(f"{BUCKET}/out").mkdir()
  image_io.write_image(f"{BUCKET}/out/label.png", np.full((4, 6), 7, np.uint8))
  np.testing.assert_array_equal(
      image_io.decode_label(image_io.read_bytes(f"{BUCKET}/out/label.png"), "label.png"),
      np.full((4, 6), 7, np.uint8))


# ---------------------------------------------------------------------------
# (b) A converted checkpoint in the bucket
# ---------------------------------------------------------------------------


def test_converted_checkpoint_in_a_bucket_round_trips(bucket, monkeypatch):
  """``variables_io`` keeps the ``gs://`` path (no abspath of a URL) and writes
  ``meta.json`` and checks the directory through epath. The arrays go through
  orbax, which writes them with tensorstore's own gcs driver: that cannot be
  served by the epath mock, so the three orbax calls get the bucket path
  translated to its local folder here (after checking they were given the URL)."""
  from offseg_jax.conversion import variables_io  # pylint: disable=g-import-not-at-top

  def translated(original):
    def call(path, *args):
      assert os.fspath(path).startswith(BUCKET + "/"), path
      return original(epath.Path(bucket.local(path)), *args)
    return call

  for name in ("_orbax_save", "_orbax_metadata", "_orbax_restore"):
    monkeypatch.setattr(variables_io, name, translated(getattr(variables_io, name)))
  variables = {"params": {"backbone": {"w": np.arange(6, dtype=np.float32).reshape(2, 3)},
                          "head": {"b": np.ones(3, np.float32)}},
               "batch_stats": {"backbone": {"mean": np.zeros(3, np.float32)}}}
  out = f"{BUCKET}/converted/tiny"
  assert not variables_io.is_converted_checkpoint(out)
  assert variables_io.save_variables(out, variables, {"model": "tiny", "num_classes": 3}) == out
  assert json.loads((bucket.root / "converted/tiny/meta.json").read_text()) == {
      "model": "tiny", "num_classes": 3}
  assert (bucket.root / "converted/tiny/variables").is_dir()
  assert variables_io.is_converted_checkpoint(out)
  assert variables_io.load_meta(out + "/variables")["model"] == "tiny"
  assert variables_io.stored_shapes(out)["params/backbone/w"] == (2, 3)
  restored = variables_io.load_variables(out)
  np.testing.assert_array_equal(restored["params"]["backbone"]["w"],
                                variables["params"]["backbone"]["w"])
  target = {"params": {"backbone": {"w": np.zeros((2, 3), np.float32)},
                       "head": {"b": np.zeros(3, np.float32)}},
            "batch_stats": {"backbone": {"mean": np.zeros(3, np.float32)}}}
  restored = variables_io.load_variables(out, target)
  np.testing.assert_array_equal(restored["params"]["head"]["b"], np.ones(3))
  with pytest.raises(FileNotFoundError, match=r"^gs://fake-bucket/converted: not a converted"):
    variables_io.load_meta(f"{BUCKET}/converted")


def test_torch_checkpoint_is_read_from_a_bucket(bucket):
  from offseg_jax.conversion import torch_pickle  # pylint: disable=g-import-not-at-top
  test_conversion = pytest.importorskip("test_conversion")   # its torch-free .pth writer
  weights = {"conv.weight": np.arange(12, dtype=np.float32).reshape(2, 2, 3)}
  test_conversion.write_torch_file(bucket.root / "w.pth", {"state_dict": weights})
  remote = torch_pickle.read_checkpoint(f"{BUCKET}/w.pth")
  np.testing.assert_array_equal(remote.state_dict["conv.weight"], weights["conv.weight"])
  (bucket.root / "bad.pth").write_bytes(b"garbage")
  with pytest.raises(torch_pickle.CheckpointReadError, match=r"gs://fake-bucket/bad.pth: not"):
    torch_pickle.read_checkpoint(f"{BUCKET}/bad.pth")
  with pytest.raises(torch_pickle.CheckpointReadError, match=r"gs://fake-bucket/no.pth: no such"):
    torch_pickle.read_checkpoint(f"{BUCKET}/no.pth")


# ---------------------------------------------------------------------------
# (c) Evaluation outputs in the bucket
# ---------------------------------------------------------------------------


def test_evaluation_report_is_written_to_a_bucket(bucket):
  from offseg_jax import metric_log  # pylint: disable=g-import-not-at-top
  from offseg_jax.evaluation import metrics, report  # pylint: disable=g-import-not-at-top
  # (tensorboardX does its own IO, which the fake bucket cannot serve)
  log = metric_log.MetricLog(f"{BUCKET}/workdir", tensorboard=False)
  for step in (1, 2, 3):
    log.scalars(step, {"loss": 1.0 / step}, "train/")
  log.close()
  names = ("sky", "road", "car")
  confusion = np.array([[50, 2, 0], [3, 40, 1], [0, 0, 9]], np.int64)
  summary = metrics.summarize(confusion, names)
  out = f"{BUCKET}/eval/out"
  paths = report.save_results(out, summary, confusion, names, {"model": "tiny"})
  assert {k: os.fspath(p) for k, p in paths.items()} == {
      "metrics": f"{out}/metrics.json", "confusion_npy": f"{out}/confusion.npy",
      "confusion_png": f"{out}/confusion.png"}
  local = bucket.root / "eval" / "out"
  written = json.loads((local / "metrics.json").read_text())
  assert written["mIoU"] == summary["mIoU"] and written["meta"] == {"model": "tiny"}
  np.testing.assert_array_equal(np.load(local / "confusion.npy"), confusion)
  rng = np.random.default_rng(0)
  samples = [{"name": "a", "image": rng.integers(0, 256, (8, 12, 3), dtype=np.uint8),
              "label": rng.integers(0, 3, (8, 12)), "pred": rng.integers(0, 3, (8, 12))}]
  md = report.write_report(out, summary, confusion, names, np.eye(3, dtype=np.uint8) * 255,
                           samples=samples, workdir=f"{BUCKET}/workdir", meta={"x": 1},
                           draw_confusion=False)
  assert os.fspath(md) == f"{out}/report.md"
  text = (local / "report.md").read_text()
  for png in ("confusion.png", "per_class_iou.png", "samples.png", "training_curves.png"):
    assert (local / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    assert f"]({png})" in text
  assert metric_log.read_scalars(f"{BUCKET}/workdir")["train/loss"][0] == (1, pytest.approx(1.0))


def test_predict_outputs_and_scoring_in_a_bucket(bucket, monkeypatch):
  """predict's image listing, reading and PNG writing, and scoring those PNGs."""
  from offseg_jax import predict  # pylint: disable=g-import-not-at-top
  from offseg_jax.evaluation import runner  # pylint: disable=g-import-not-at-top
  images = bucket.root / "images"
  (images / "nested").mkdir(parents=True)
  rng = np.random.default_rng(0)
  photo = rng.integers(0, 256, (6, 10, 3), dtype=np.uint8)
  assert cv2.imwrite(str(images / "nested" / "b.png"), photo)
  assert cv2.imwrite(str(images / "a.jpg"), photo)
  (images / "notes.txt").write_text("not an image")
  files = predict.list_images(f"{BUCKET}/images")
  assert [(os.fspath(p), os.fspath(r)) for p, r in files] == [
      (f"{BUCKET}/images/a.jpg", "a.jpg"), (f"{BUCKET}/images/nested/b.png", "nested/b.png")]
  np.testing.assert_array_equal(predict.read_image(files[1][0]), photo[..., ::-1])
  assert predict.ImageFiles(files).example_size(1) == (6, 10)
  pred = rng.integers(0, 3, (6, 10))
  written = predict.write_outputs(epath.Path(f"{BUCKET}/out"), files[1][1], photo, pred,
                                  np.eye(3, dtype=np.uint8) * 255, False, 0.5)
  assert os.fspath(written["raw"]) == f"{BUCKET}/out/raw/nested/b.png"
  np.testing.assert_array_equal(runner.read_label_png(written["raw"]), pred)
  assert runner.read_label_png(written["palette"]).shape == (6, 10)
  with pytest.raises(predict.UnreadableImageError, match="gs://fake-bucket/images/notes.txt"):
    predict.read_image(f"{BUCKET}/images/notes.txt")
