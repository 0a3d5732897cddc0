r"""Converts an official PyTorch checkpoint into a converted (orbax) checkpoint.

Usage::

  python -m offseg_jax.convert --model offseg_t --num-classes 150 \
      offseg-t_ade20k.pth converted/offseg_t_ade
  python -m offseg_jax.convert --model offseg_t --backbone-only \
      pretrained/eformer_v2/eformer_s1_450.pth converted/eformer_s1

``SRC`` is the ``.pth``/``.pt`` file, ``DST`` the output directory
(``variables/`` + ``meta.json``). Flags (``--help`` lists them) may be spelled
with dashes or underscores (``--num-classes`` = ``--num_classes``). Bad input
ends with one ``error: ...`` line: status 2 for the command line, 1 when the
checkpoint does not fit the model.

The model is built from the registry (``offseg_jax.models.build_model``), or,
when the checkpoint's ``meta`` embeds the official mmseg config and the model's
registry entry has ``from_official``, from that config (``--ignore-meta`` turns
this off). Weights are mapped by name (``conversion.core.torch_to_flax``);
missing and unexpected keys are printed by name, shape mismatches are refused.

``--backbone-only`` maps just the backbone, for ImageNet / mmseg pretrain
files whose keys have no ``backbone.`` prefix (their classifier keys
``norm.*``, ``head.*``, ``dist_head.*`` are ignored) or full segmentor
checkpoints (their ``backbone.*`` part). The output holds ``params/backbone``
and ``batch_stats/backbone``; weights the file lacks (e.g. EfficientFormerV2's
``attention_biases_seg``) stay at the model's fresh initialisation when a
trainer merges it (``variables_io.merge_into``).

VAN checkpoints in the VAN-Classification (ImageNet ``van_b0.pth`` ...) or mmseg
``projects/van`` key layout are recognised by their keys and renamed to ours
first (``conversion.van_names``: the ImageNet ``head.*`` is dropped).
"""

from __future__ import annotations

import ast
import functools
import os
import sys
from typing import Any, Callable, Mapping, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from input_pipeline import storage
from offseg_jax import cli, models
from offseg_jax.conversion import core, torch_pickle, van_names, variables_io
from offseg_jax.registry import MODELS

# Classification-head keys of ImageNet backbone checkpoints (EfficientFormerV2's
# final norm, head and distillation head), after the ``backbone.`` prefix is added.
BACKBONE_CLASSIFIER_IGNORE = (r"^backbone\.(norm|head|dist_head)\.",)

# Input sizes tried, in order, to build the variable template (shapes only).
TEMPLATE_SIZES = (256, 512)


class ConvertError(ValueError):
  """The checkpoint cannot be converted for this model; the message says why."""


# ----------------------------------------------------------------------------
# The official config embedded in a checkpoint's meta
# ----------------------------------------------------------------------------

class _NotLiteral(Exception):
  pass


_BINOPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b,
           ast.Mult: lambda a, b: a * b, ast.Div: lambda a, b: a / b,
           ast.FloorDiv: lambda a, b: a // b}


def _evaluate(node: ast.AST, env: Mapping[str, Any]):
  """Evaluates config literals: constants, containers, ``dict(...)``, names."""
  if isinstance(node, ast.Constant):
    return node.value
  if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
    values = [_evaluate(e, env) for e in node.elts]
    return values if isinstance(node, ast.List) else tuple(values)
  if isinstance(node, ast.Dict):
    out = {}
    for k, v in zip(node.keys, node.values):
      if k is None:
        out.update(_evaluate(v, env))
      else:
        out[_evaluate(k, env)] = _evaluate(v, env)
    return out
  if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict"
      and not node.args):
    out = {}
    for kw in node.keywords:
      value = _evaluate(kw.value, env)
      if kw.arg is None:
        out.update(value)
      else:
        out[kw.arg] = value
    return out
  if isinstance(node, ast.Name) and node.id in env:
    return env[node.id]
  if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
    value = _evaluate(node.operand, env)
    return -value if isinstance(node.op, ast.USub) else value
  if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
    return _BINOPS[type(node.op)](_evaluate(node.left, env), _evaluate(node.right, env))
  raise _NotLiteral(ast.dump(node)[:80])


def parse_config_text(text: str) -> dict[str, Any]:
  """Top-level ``name = value`` assignments of an mmengine/mmcv config text.

  Nothing is executed: only literals, ``dict(...)`` calls and references to
  earlier assignments are evaluated; other assignments are skipped.
  """
  env: dict[str, Any] = {}
  for stmt in ast.parse(text).body:
    if (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1
        and isinstance(stmt.targets[0], ast.Name)):
      try:
        env[stmt.targets[0].id] = _evaluate(stmt.value, env)
      except (_NotLiteral, TypeError, ValueError, ZeroDivisionError):
        continue
  return env


def official_model_config(meta: Mapping[str, Any] | None) -> dict | None:
  """The official ``model`` config embedded in a checkpoint's ``meta``, if any.

  mmengine stores the config text under ``meta['cfg']``, mmcv 1.x under
  ``meta['config']``; either may also be a dict.
  """
  if not meta:
    return None
  for field in ("cfg", "config"):
    cfg = meta.get(field)
    if isinstance(cfg, str):
      try:
        cfg = parse_config_text(cfg)
      except SyntaxError:
        continue
    if isinstance(cfg, Mapping) and isinstance(cfg.get("model"), Mapping):
      return dict(cfg["model"])
  return None


# ----------------------------------------------------------------------------
# Conversion
# ----------------------------------------------------------------------------

def variable_template(model, input_size: int | None = None, **inputs) -> dict:
  """``jax.eval_shape`` of ``model.init`` on a dummy 1xSxSx3 image (no compute)."""
  sizes = (input_size,) if input_size else TEMPLATE_SIZES
  error = None
  for size in sizes:
    images = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    init = functools.partial(model.init, train=False, **inputs)
    try:
      return flax.core.unfreeze(jax.eval_shape(init, jax.random.key(0), images))
    except Exception as e:  # pylint: disable=broad-except  # next size, re-raised below
      error = e
  raise ConvertError(f"could not initialise the model on a {sizes[-1]}x{sizes[-1]} input: "
                     f"{type(error).__name__}: {error}") from error


def _names(keys, limit: int = 50) -> str:
  keys = list(keys)
  more = f"\n    ... and {len(keys) - limit} more" if len(keys) > limit else ""
  return "".join(f"\n    {k}" for k in keys[:limit]) + more


def _count(tree) -> int:
  return int(sum(np.size(x) for x in jax.tree.leaves(tree)))


def build_for_checkpoint(model_name: str, num_classes: int | None,
                         official: Mapping[str, Any] | None):
  """Builds ``model_name`` (from ``official`` when given and supported)."""
  entry = MODELS.get(model_name)
  if official is not None and entry.from_official is not None:
    return entry.from_official(dict(official), num_classes)
  return models.build_model({"name": model_name}, num_classes)


def convert_checkpoint(src: str, out_dir: str, *, model_name: str,
                       num_classes: int | None = None, backbone_only: bool = False,
                       use_meta: bool = True, allow_unexpected: bool = False,
                       checkpoint_key: str | None = None, input_size: int | None = None,
                       log: Callable[[str], None] = print) -> dict:
  """Converts ``src`` for ``model_name`` and writes ``out_dir``; returns its meta.

  Raises:
    torch_pickle.CheckpointReadError: unreadable checkpoint.
    ConvertError: the weights do not fit the model (keys named).
  """
  entry = MODELS.get(model_name)
  ckpt = torch_pickle.read_checkpoint(src, checkpoint_key)
  log(f"read {len(ckpt.state_dict)} tensors from {src}"
      + (f" (entry {ckpt.source_key!r})" if ckpt.source_key else ""))
  official = official_model_config(ckpt.meta) if use_meta else None
  if official is not None and entry.from_official is None:
    log(f"note: {model_name} has no from_official; ignoring the config in the checkpoint meta")
    official = None
  if num_classes is None and official is not None:
    num_classes = (official.get("decode_head") or {}).get("num_classes")
  if num_classes is None:
    if not backbone_only:
      raise ConvertError("--num-classes is required (the checkpoint meta does not give it)")
    num_classes = 150     # irrelevant: only the backbone is converted
  num_classes = int(num_classes)
  model = build_for_checkpoint(model_name, num_classes, official)
  if official is not None:
    log(f"built {model_name} from the official config in the checkpoint meta")
  template = variable_template(model, input_size)
  template = {c: v for c, v in template.items() if c in ("params", "batch_stats") or v}

  state = dict(ckpt.state_dict)
  if van_names.is_van_state_dict(state):   # ImageNet / mmseg-projects VAN key layouts
    state, changes = van_names.van_state_dict_to_ours(state)
    for line in van_names.describe_changes(changes):
      log(line)
  ignore = tuple(entry.torch_ignore)
  if backbone_only:
    template = {c: {"backbone": v["backbone"]} for c, v in template.items() if "backbone" in v}
    if not template:
      raise ConvertError(f"{model_name} has no 'backbone' submodule")
    if any(k.startswith("backbone.") for k in state):
      dropped = [k for k in state if not k.startswith("backbone.")]
      state = {k: v for k, v in state.items() if k.startswith("backbone.")}
      if dropped:
        log(f"backbone-only: skipping {len(dropped)} non-backbone keys of the checkpoint")
    else:
      state = {"backbone." + k: v for k, v in state.items()}
      ignore += BACKBONE_CLASSIFIER_IGNORE

  try:
    variables, report = core.torch_to_flax(state, template, ignore=ignore, strict=False)
  except core.ConversionError as e:
    raise ConvertError(f"{src} does not fit {model_name}: {e}") from e
  converted = _count(variables)
  log(f"converted {len(jax.tree.leaves(variables))} arrays ({converted:,} values); "
      f"ignored {len(report['ignored'])} keys by pattern")
  if report["missing"]:
    log(f"missing from the checkpoint ({len(report['missing'])}):" + _names(report["missing"]))
  if report["unexpected"]:
    log(f"unexpected in the checkpoint ({len(report['unexpected'])}):"
        + _names(report["unexpected"]))
  problems = []
  if report["missing"] and not backbone_only:
    problems.append(f"{len(report['missing'])} model weights are missing from the checkpoint")
  if report["unexpected"] and not allow_unexpected:
    problems.append(f"{len(report['unexpected'])} checkpoint keys are not used by the model "
                    "(--allow-unexpected to drop them)")
  if not jax.tree.leaves(variables):
    problems.append("no weight of the model was found in the checkpoint")
  if problems:
    raise ConvertError(f"{src} does not fit {model_name}: " + "; ".join(problems)
                       + ". The keys are listed above.")
  if backbone_only and report["missing"]:
    log("these stay at the model's fresh initialisation when the backbone is merged")

  meta = {
      "model": model_name,
      "num_classes": None if backbone_only else num_classes,
      "backbone_only": backbone_only,
      "source": os.fspath(storage.absolute(src)),
      "source_key": ckpt.source_key,
      "official_config": official,
      "report": {"missing": report["missing"], "unexpected": report["unexpected"],
                 "ignored": report["ignored"], "ignore_patterns": list(ignore),
                 "num_arrays": len(jax.tree.leaves(variables)), "num_values": converted},
  }
  written = variables_io.save_variables(out_dir, variables, meta)
  log(f"wrote {written}")
  return meta


USAGE = "python -m offseg_jax.convert --model=NAME [--num_classes=N] [--backbone_only] SRC DST"


def define_flags(values: flags.FlagValues = flags.FLAGS) -> None:
  """The command's flags, on ``values`` (defined only when it runs)."""
  on = {"flag_values": values}
  flags.DEFINE_string("model", None, "Registered model name, e.g. offseg_t.", required=True, **on)
  flags.DEFINE_integer("num_classes", None, "Classes of the head (default: from the meta).", **on)
  flags.DEFINE_bool("backbone_only", False,
                    "Convert only the backbone (ImageNet / pretrain checkpoints).", **on)
  flags.DEFINE_string("checkpoint_key", None, "Top-level entry holding the weights "
                      "(default: state_dict, model, ...).", **on)
  flags.DEFINE_bool("ignore_meta", False, "Build the model by name even if the checkpoint "
                    "embeds its config.", **on)
  flags.DEFINE_bool("allow_unexpected", False, "Drop unused checkpoint keys, not fail.", **on)
  flags.DEFINE_integer("input_size", None, "Dummy input size for shape inference "
                       "(default: 256, then 512).", **on)
  flags.DEFINE_bool("force", False, "Overwrite DST if it holds a converted checkpoint.", **on)
  flags.register_validator("model", cli.in_registry(MODELS), **on)


def command(argv: Sequence[str], values: flags.FlagValues = flags.FLAGS) -> int:
  """Converts ``SRC`` to ``DST`` (``argv[1:]``) as the flags say; returns the exit status."""
  src, out_dir = cli.positional(argv, 2, 2, usage=USAGE)
  if variables_io.is_converted_checkpoint(out_dir) and not values.force:
    print(f"error: {out_dir} already holds a converted checkpoint (--force to overwrite)",
          file=sys.stderr)
    return 1
  try:
    convert_checkpoint(src, out_dir, model_name=values.model, num_classes=values.num_classes,
                       backbone_only=values.backbone_only, use_meta=not values.ignore_meta,
                       allow_unexpected=values.allow_unexpected,
                       checkpoint_key=values.checkpoint_key, input_size=values.input_size)
  except (ValueError, KeyError) as e:   # ConvertError, CheckpointReadError, config errors
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


# main([...]): the command in this process, e.g. from tests and notebooks.
main = cli.in_process(define_flags, command)


if __name__ == "__main__":
  cli.run(command, define_flags)
