r"""Checks registered components against the official parity fixtures.

Usage::

  python -m offseg_jax.tools.parity ../shared/parity/offseg_t.npz [more.npz ...]
  python -m offseg_jax.tools.parity ../shared/parity            # every fixture
  python -m offseg_jax.tools.parity --skip-unregistered ../shared/parity

Each fixture's JSON ``parity`` header names the component (``build``) and its
kind. The tool builds it with the registry entry's ``from_official(official_config,
num_classes)``, converts the fixture's ``state/*`` weights with the same code
as a real checkpoint (``conversion.core.torch_to_flax`` with the entry's
``torch_ignore``), runs the eval forward in float32 at the highest matmul
precision, and prints one JSON line per fixture::

  {"fixture": "offseg_t", "errors": {"logits": 2.1e-05, ...}, "pass": true, ...}

``errors`` holds the max absolute error of every key in ``compare`` (for
segmentors also ``logits_full`` and ``pred``: the fraction of flipped argmax
pixels, which passes up to 1e-3); ``extra`` has unscored diagnostics (backbone
features). The exit status is non-zero if any fixture fails or names a component
that is not registered (``--skip-unregistered`` accepts the latter); without
arguments every fixture of the default directory (``$OFFSEG_SHARED/parity``,
else ``shared/parity`` next to this repository) is checked.
"""

from __future__ import annotations

import fnmatch
import inspect
import json
import os
import re
import time
from typing import Any, Mapping, Sequence

from etils import epath
import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from offseg_jax import cli
from offseg_jax import models  # noqa: F401  (registers every model family)
from offseg_jax.conversion import core
from offseg_jax.models import layers
from offseg_jax.registry import BACKBONES, BLOCKS, HEADS, METRICS, MODELS, NECKS

try:  # registers the metrics; absent until the evaluation package lands
  from offseg_jax.evaluation import metrics as _metrics
except ImportError:  # pragma: no cover - depends on what is installed
  _metrics = None

# Registries searched for each fixture kind, in order.
KIND_REGISTRIES = {
    "segmentor": (MODELS,),
    "backbone": (BACKBONES,),
    "head": (HEADS,),
    "neck_head": (NECKS, HEADS),
    "block": (BLOCKS,),
    "metric": (METRICS,),
}

# State-dict prefixes a stand-alone component's fixture may carry (README: backbone
# fixtures are ``backbone.*``); stripped when every key has it.
_COMPONENT_PREFIXES = ("backbone.", "decode_head.")

PRED_TOLERANCE = 1e-3          # fraction of argmax flips allowed at near-ties

# Metric keys the header's patterns do not cover: percent tables are rounded to 2
# decimals like the summaries; pixel counts are exact; aAcc is a per-class-like ratio.
_METRIC_DEFAULT_TOLERANCES = (("table/*", 0.01), ("total/*", 0.0), ("overall/*", 1e-6))


def default_fixture_dir() -> str:
  """``$OFFSEG_SHARED/parity``, else ``<repo>/../shared/parity``."""
  shared = os.environ.get("OFFSEG_SHARED")
  if not shared:   # next to this package's repository (module files are local)
    shared = epath.Path(__file__).resolve().parents[3] / "shared"
  return os.fspath(epath.Path(shared) / "parity")


def _paths(path: str) -> tuple[str, str, str]:
  stem = re.sub(r"\.(npz|json)$", "", os.fspath(path))
  return epath.Path(stem).name, stem + ".npz", stem + ".json"


def _load_npz(path: str) -> dict[str, np.ndarray]:
  with epath.Path(path).open("rb") as f, np.load(f) as data:
    return {k: data[k] for k in data.files}


def _find_entry(kind: str, build: str):
  for registry in KIND_REGISTRIES.get(kind, ()):
    if build in registry:
      return registry.get(build)
  return None


def _nchw(x: np.ndarray) -> np.ndarray:
  return x.transpose(0, 3, 1, 2) if x.ndim == 4 else x


def _nhwc(x: np.ndarray) -> np.ndarray:
  return x.transpose(0, 2, 3, 1) if x.ndim == 4 else x


def fixture_inputs(arrays: Mapping[str, np.ndarray], names) -> tuple[list, dict]:
  """Positional and keyword forward inputs, NHWC.

  ``input`` is the image (one positional argument); ``input/<i>`` are gathered
  into one tuple of feature maps; any other key is a keyword argument named
  with ``/`` -> ``_`` (``ham/bases`` -> ``ham_bases``) and passed unchanged.
  """
  positional, features, keywords = [], [], {}
  for name in names:
    if name == "input":
      positional.append(_nhwc(arrays[name]))
    elif re.fullmatch(r"input/\d+", name):
      features.append((int(name.split("/")[1]), _nhwc(arrays[name])))
    else:
      keywords[name.replace("/", "_")] = arrays[name]
  if features:
    positional.append(tuple(x for _, x in sorted(features, key=lambda t: t[0])))
  return positional, keywords


def fixture_state(arrays: Mapping[str, np.ndarray], kind: str) -> dict[str, np.ndarray]:
  """The fixture's ``state/*`` weights, with a stand-alone component's prefix removed."""
  state = {k[len("state/"):]: v for k, v in arrays.items() if k.startswith("state/")}
  if kind in ("backbone", "head", "block"):
    for prefix in _COMPONENT_PREFIXES:
      if state and all(k.startswith(prefix) for k in state):
        state = {k[len(prefix):]: v for k, v in state.items()}
        break
  return state


def _flatten_outputs(out, prefix: str, into: dict):
  if isinstance(out, Mapping):
    for k, v in out.items():
      _flatten_outputs(v, f"{prefix}/{k}" if prefix else str(k), into)
  elif isinstance(out, (tuple, list)):
    for i, v in enumerate(out):
      _flatten_outputs(v, f"{prefix}/{i}", into)
  elif hasattr(out, "shape"):
    into[prefix] = np.asarray(out)


def named_outputs(kind: str, out) -> dict[str, np.ndarray]:
  """The module output as ``{npz key: array}`` (our NHWC layout).

  A backbone's tuple becomes ``backbone/<i>``; a bare array ``output`` (blocks)
  or ``logits``; a ``(logits, aux)`` pair ``logits`` plus the flattened aux
  dict (``neck/<i>``, ...); a dict its flattened entries.
  """
  named: dict[str, np.ndarray] = {}
  main_key = "output" if kind == "block" else "logits"
  if kind == "backbone" and isinstance(out, (tuple, list)):
    _flatten_outputs(tuple(out), "backbone", named)
  elif hasattr(out, "shape"):
    named[main_key] = np.asarray(out)
  elif (isinstance(out, tuple) and len(out) == 2 and hasattr(out[0], "shape")
        and isinstance(out[1], Mapping)):
    _flatten_outputs(out[1], "", named)
    named[main_key] = np.asarray(out[0])
  elif isinstance(out, Mapping):
    _flatten_outputs(out, "", named)
  else:
    _flatten_outputs(out, main_key, named)
  return named


def _max_abs(ours: np.ndarray, ref: np.ndarray) -> float:
  if ours.shape != ref.shape:
    raise ValueError(f"shape {ours.shape} (as NCHW), reference {ref.shape}")
  diff = np.abs(ours.astype(np.float64) - ref.astype(np.float64))
  return float(diff.max()) if diff.size else 0.0


def _takes_train(module) -> bool:
  return "train" in inspect.signature(type(module).__call__).parameters


def _run_module(module, state, kind, positional, keywords, ignore):
  train = {"train": False} if _takes_train(module) else {}
  template = jax.eval_shape(lambda k: module.init(k, *positional, **keywords, **train),
                            jax.random.key(0))
  variables, _ = core.torch_to_flax(state, template, ignore=ignore, strict=True)
  apply = jax.jit(lambda v, args, kw: module.apply(v, *args, **kw, **train))
  with jax.default_matmul_precision("highest"):
    out = apply(jax.tree.map(jnp.asarray, variables), positional, keywords)
  return named_outputs(kind, jax.device_get(out))


def _compare_model(spec, arrays, kind, named) -> tuple[dict, dict, dict]:
  errors, tolerances, extra = {}, {}, {}
  compare = dict(spec.get("compare", {}))
  if kind == "segmentor":
    logits_tol = compare.get("logits")
    if "logits_full" in arrays and "logits_full" not in compare and logits_tol is not None:
      compare["logits_full"] = logits_tol
    if "pred" in arrays and "pred" not in compare:
      compare["pred"] = PRED_TOLERANCE
  full = None
  if ("logits_full" in compare or "pred" in compare) and "logits" in named:
    size = arrays["input"].shape[2:]
    full = np.asarray(layers.resize_bilinear(jnp.asarray(named["logits"]), size))
  for key, tol in compare.items():
    tolerances[key] = float(tol)
    try:
      if key == "logits_full":
        classes = arrays["logits_full_classes"].astype(np.int64)
        errors[key] = _max_abs(_nchw(full[..., classes]), arrays[key])
      elif key == "pred":
        pred = np.argmax(full, axis=-1)
        ref = arrays[key].astype(np.int64)
        if pred.shape != ref.shape:
          raise ValueError(f"shape {pred.shape}, reference {ref.shape}")
        errors[key] = float(np.mean(pred != ref))
      elif key in named:
        errors[key] = _max_abs(_nchw(named[key]), arrays[key])
      else:
        errors[key] = float("inf")
        extra[f"{key}:error"] = "the module does not produce this output"
    except (ValueError, TypeError, IndexError) as e:
      errors[key] = float("inf")
      extra[f"{key}:error"] = str(e)
  for key, value in named.items():   # unscored diagnostics, e.g. backbone/<i>
    if key not in compare and key in arrays and arrays[key].ndim == value.ndim:
      try:
        extra[key] = _max_abs(_nchw(value), arrays[key])
      except ValueError:
        pass
  return errors, tolerances, extra


def _metric_tolerance(key: str, compare: Mapping[str, Any]) -> float | None:
  base = re.sub(r"^nan_to_num_[^/]+/", "", key)
  for pattern, tol in list(compare.items()) + list(_METRIC_DEFAULT_TOLERANCES):
    if fnmatch.fnmatch(base, pattern):
      if isinstance(tol, str):   # e.g. "rtol 1e-6, NaN positions exact"
        match = re.search(r"[-+]?\d*\.?\d+(?:[eE][-+]?\d+)?", tol.split("rtol", 1)[-1])
        return float(match.group()) if match else None
      return float(tol)
  return None


def _check_metric(spec, npz_path, json_path, result) -> dict:
  replay = getattr(_metrics, f"{spec['build']}_from_fixture", None) if _metrics else None
  if replay is None:
    result.update({"pass": False, "skipped": "not registered",
                   "reason": f"no offseg_jax.evaluation.metrics.{spec['build']}_from_fixture"})
    return result
  errors = replay(npz_path, json_path)
  tolerances = {k: _metric_tolerance(k, spec.get("compare", {})) for k in errors}
  result["errors"] = errors
  result["tolerances"] = tolerances
  failed = [k for k, e in errors.items()
            if tolerances[k] is None or not np.isfinite(e) or e > tolerances[k]]
  result["failed"] = failed
  result["pass"] = not failed
  return result


def check_fixture(path: str | os.PathLike) -> dict:
  """Checks one fixture (``NAME.npz`` or ``NAME.json``); returns the result dict.

  Keys: ``fixture``, ``kind``, ``build``, ``errors`` (key -> max abs error, or
  the flip fraction for ``pred``), ``tolerances``, ``failed``, ``pass``,
  ``extra`` (diagnostics), ``seconds``; ``skipped: 'not registered'`` (with
  ``pass: False``) when no registry entry can build the component.
  """
  start = time.time()
  name, npz_path, json_path = _paths(os.fspath(path))
  spec = json.loads(epath.Path(json_path).read_text())["parity"]
  kind, build = spec["kind"], spec["build"]
  result: dict[str, Any] = {"fixture": name, "kind": kind, "build": build}
  if kind not in KIND_REGISTRIES:
    raise ValueError(f"{json_path}: unknown parity kind {kind!r}")
  entry = _find_entry(kind, build)
  if entry is None:
    result.update({"pass": False, "skipped": "not registered", "errors": {}})
    return result
  if kind == "metric":
    return _check_metric(spec, npz_path, json_path, result)
  if entry.from_official is None:
    result.update({"pass": False, "skipped": "not registered", "errors": {},
                   "reason": f"{build} is registered without from_official"})
    return result
  arrays = _load_npz(npz_path)
  module = entry.from_official(spec.get("official_config", {}), spec.get("num_classes"))
  positional, keywords = fixture_inputs(arrays, spec.get("inputs", ["input"]))
  state = fixture_state(arrays, kind)
  named = _run_module(module, state, kind, positional, keywords, entry.torch_ignore)
  errors, tolerances, extra = _compare_model(spec, arrays, kind, named)
  failed = [k for k, e in errors.items() if not e <= tolerances[k]]
  result.update({"errors": errors, "tolerances": tolerances, "failed": failed,
                 "pass": not failed, "extra": extra,
                 "seconds": round(time.time() - start, 2)})
  return result


def _expand(paths) -> list[str]:
  out = []
  for p in paths:
    if epath.Path(p).is_dir():
      out += sorted(os.fspath(f) for f in epath.Path(p).iterdir() if f.name.endswith(".npz"))
    else:
      out.append(p)
  return out


def define_flags(values: flags.FlagValues = flags.FLAGS) -> None:
  """The command's flag, on ``values`` (defined only when it runs)."""
  flags.DEFINE_bool("skip_unregistered", False, "Exit 0 when a fixture's component is not "
                    "registered.", flag_values=values)


def command(argv: Sequence[str], values: flags.FlagValues = flags.FLAGS) -> int:
  """Checks the fixtures named in ``argv[1:]`` (files or directories; none: the
  default directory), one JSON line each; returns the exit status."""
  status = 0
  for path in _expand(cli.positional(argv, maximum=None) or [default_fixture_dir()]):
    try:
      result = check_fixture(path)
    except Exception as e:  # pylint: disable=broad-except  # report and go on to the next
      result = {"fixture": _paths(path)[0], "pass": False, "error": f"{type(e).__name__}: {e}"}
    print(json.dumps(result), flush=True)
    if result.get("skipped") == "not registered":
      if not values.skip_unregistered:
        status = 1
    elif not result["pass"]:
      status = 1
  return status


# main([...]): the command in this process, e.g. from tests and notebooks.
main = cli.in_process(define_flags, command)


if __name__ == "__main__":
  cli.run(command, define_flags)
