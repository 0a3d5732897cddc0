r"""Parameter and FLOP counts of a registered model, under the papers' conventions.

Usage::

  python -m offseg_jax.tools.complexity --model offseg_t --num-classes 150 --size 512,512
  python -m offseg_jax.tools.complexity --model segformer_b0_ol --size 512,512 --json
  python -m offseg_jax.tools.complexity --model frm_van_b0 --size 1024,2048 --no-xla

``--size`` is the input's H,W (one number: a square); ``--no-xla`` (absl's
``--noxla``) only traces. Flag names take dashes or underscores alike.

Three FLOP figures are reported for the eval forward of one image:

* ``xla_gflops``: XLA's cost analysis of the compiled forward, which counts one
  multiply-add as 2 FLOPs (plus elementwise ops) and skips padded taps;
  ``xla_gmacs`` = ``xla_gflops / 2`` is the "1 MAC = 1 FLOP" reading.
* ``conv_gmacs``: multiply-adds of the convolutions as the official code has
  them, from the traced program (``N*Ho*Wo*Cout*(Cin/groups)*kh*kw`` per
  ``conv_general_dilated``, padded taps included as torch counters do), plus
  the matrix products of modules that are convolutions in the official code
  (EfficientFormerV2's talking heads, see ``TORCH_CONVS_AS_MATMULS``).
* ``matmul_gmacs``: convolutions plus every matrix product (``dot_general``).

The published numbers follow two conventions (``shared/parity/figures.json``):
OffSeg's GFLOPs equal ``conv_gmacs``; SegFormer-OL's and SegNeXt-OL's equal
mmengine's counter, which counts the MACs of convolutions, linears and matmuls
plus small norm/activation terms -- ``matmul_gmacs`` is that count minus those
terms (about 1.5 % lower). ``paper_gflops`` reports the figure in the
convention of the model's family (:func:`paper_gmacs`, which
``tools.complexity_table`` uses as well, so both tools print one figure).

:func:`parameter_table` (from ``models.construction``) is the per-parameter table
(clu's parameter overview) that the trainer writes to WORKDIR/parameters.txt.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from typing import Any, Callable, Sequence

from etils import epath
import flax
import jax
import jax.extend as jex
import jax.numpy as jnp
from absl import flags

from offseg_jax import cli, models
from offseg_jax.models import layers
from offseg_jax.models.construction import parameter_table  # noqa: F401  (re-exported)
from offseg_jax.registry import MODELS

_MMENGINE = ("paper GFLOPs = mmengine's counter (MACs of convs, linears and matmuls + "
             "~1.5 % norm/activation terms); reported: conv + matmul GMACs")
# Paper convention per model family (name prefix): (figure used, explanation).
PAPER_CONVENTIONS = {
    "offseg": ("conv_gmacs", "OffSeg paper GFLOPs = GMACs of the convolutions only "
                             "(EfficientFormerV2's talking heads are convolutions there)"),
    "segformer": ("matmul_gmacs", _MMENGINE),
    "segnext": ("matmul_gmacs", _MMENGINE),
}

# Modules that the official (torch) code runs as convolutions and ours as
# matrix products: EfficientFormerV2's talking heads, 1x1 Conv2d layers across
# the head axis there, an einsum here. Matched on the module path that flax
# puts in the traced program's name stack.
TORCH_CONVS_AS_MATMULS = re.compile(r"(^|/)talking_head[12](/|$)")


# ----------------------------------------------------------------------------
# Counting in the traced program
# ----------------------------------------------------------------------------

def _conv_macs(eqn) -> int:
  rhs = eqn.invars[1].aval
  out = eqn.outvars[0].aval
  rhs_spec = eqn.params["dimension_numbers"].rhs_spec   # (out feat, in feat, *spatial)
  taps = math.prod(rhs.shape[d] for d in rhs_spec[2:])
  return math.prod(out.shape) * rhs.shape[rhs_spec[1]] * taps


def _dot_macs(eqn) -> int:
  lhs = eqn.invars[0].aval
  out = eqn.outvars[0].aval
  (lhs_contract, _), _ = eqn.params["dimension_numbers"]
  return math.prod(out.shape) * math.prod(lhs.shape[d] for d in lhs_contract)


def _sub_jaxprs(value):
  if isinstance(value, jex.core.ClosedJaxpr):
    yield value.jaxpr
  elif isinstance(value, jex.core.Jaxpr):
    yield value
  elif isinstance(value, (tuple, list)):
    for v in value:
      yield from _sub_jaxprs(v)


def count_macs(jaxpr, counters: dict[str, Callable], notes: set | None = None) -> dict[str, int]:
  """Sums ``counters[primitive](eqn)`` over a jaxpr and its sub-jaxprs.

  ``scan`` bodies count ``length`` times; of ``cond`` branches the largest
  counts; ``while`` bodies count once (trip count unknown; noted in ``notes``).
  """
  if isinstance(jaxpr, jex.core.ClosedJaxpr):
    jaxpr = jaxpr.jaxpr
  totals = {name: 0 for name in counters}
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name in counters:
      totals[name] += counters[name](eqn)
    subs = [s for v in eqn.params.values() for s in _sub_jaxprs(v)]
    if not subs:
      continue
    sub_totals = [count_macs(s, counters, notes) for s in subs]
    if name == "cond":
      best = max(sub_totals, key=lambda t: sum(t.values()))
      sub_totals = [best]
    repeat = int(eqn.params.get("length", 1)) if name == "scan" else 1
    if name == "while" and notes is not None and any(sum(t.values()) for t in sub_totals):
      notes.add("a while loop's body was counted once (trip count unknown)")
    for t in sub_totals:
      for k, v in t.items():
        totals[k] += repeat * v
  return totals


def conv_macs(jaxpr) -> int:
  """Multiply-adds of every convolution, padded taps included (torch convention)."""
  return count_macs(jaxpr, {"conv_general_dilated": _conv_macs})["conv_general_dilated"]


def matmul_macs(jaxpr) -> int:
  """Multiply-adds of convolutions plus matrix products (``dot_general``)."""
  totals = count_macs(jaxpr, {"conv_general_dilated": _conv_macs, "dot_general": _dot_macs})
  return sum(totals.values())


def _torch_conv_dot_macs(eqn) -> int:
  if TORCH_CONVS_AS_MATMULS.search(str(eqn.source_info.name_stack)):
    return _dot_macs(eqn)
  return 0


@dataclasses.dataclass(frozen=True)
class MacCounts:
  """Multiply-adds of one traced forward.

  Attributes:
    conv: the convolutions as the official code has them (ours plus the
      matrix products of ``TORCH_CONVS_AS_MATMULS`` modules).
    matmul: every convolution and matrix product.
  """
  conv: int
  matmul: int


def forward_macs(jaxpr, notes: set | None = None) -> MacCounts:
  """The conv and conv + matmul counts of a traced forward, in torch's convention."""
  totals = count_macs(jaxpr, {"conv_general_dilated": _conv_macs, "dot_general": _dot_macs},
                      notes)
  as_conv = count_macs(jaxpr, {"dot_general": _torch_conv_dot_macs})["dot_general"]
  return MacCounts(conv=totals["conv_general_dilated"] + as_conv,
                   matmul=totals["conv_general_dilated"] + totals["dot_general"])


def paper_gmacs(model_name: str, counts: MacCounts) -> float | None:
  """The model's GFLOPs in its paper's convention (None for other families).

  The one definition of the "paper convention" figure: ``analyze`` and
  ``tools.complexity_table`` both report this.
  """
  convention = PAPER_CONVENTIONS.get(_family(model_name))
  if convention is None:
    return None
  return (counts.conv if convention[0] == "conv_gmacs" else counts.matmul) / 1e9


def trace_forward(model, size, batch: int = 1):
  """``(jaxpr, variables, forward, images)`` of ``model``'s eval forward, by tracing.

  ``variables`` and ``images`` are abstract (shapes only); ``forward(v, x)``
  applies the model with the rng streams some models draw from in eval
  (SegNeXt's NMF bases; their values do not change any count).
  """
  height, width = int(size[0]), int(size[1])
  images = jax.ShapeDtypeStruct((batch, height, width, 3), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), images)
  rngs = {"ham": jax.random.key(1), "dropout": jax.random.key(2)}

  def forward(v, x):
    return model.apply(v, x, train=False, rngs=rngs)

  # Count convolutions as convolutions: on CPU, depthwise convs are otherwise
  # traced as shifted multiply-adds (offseg_jax.models.layers.depthwise_impl).
  with layers.depthwise_impl("conv"):
    jaxpr = jax.make_jaxpr(forward)(variables, images)
  return jaxpr, variables, forward, images


def xla_flops(fn: Callable, *args) -> float:
  """XLA's FLOP count of ``jit(fn)`` (1 multiply-add = 2 FLOPs) for these args."""
  cost = jax.jit(fn).lower(*args).compile().cost_analysis()
  if isinstance(cost, (list, tuple)):    # older jax: one dict per computation
    return float(sum(c.get("flops", 0.0) for c in cost))
  return float(cost.get("flops", 0.0))


# ----------------------------------------------------------------------------
# Parameters
# ----------------------------------------------------------------------------

def param_counts(params) -> dict[str, int]:
  """Total parameters and those of ``conv_seg`` when Offset Learning replaces it.

  A ``conv_seg`` next to an ``offset_learning`` module is never used (the
  official checkpoints and the papers' counts still include it).
  """
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
  total = sum(math.prod(v.shape) for v in flat.values())
  scopes_with_ol = {p[:p.index("offset_learning")] for p in flat if "offset_learning" in p}
  unused = sum(math.prod(v.shape) for p, v in flat.items()
               if "conv_seg" in p and p[:p.index("conv_seg")] in scopes_with_ol)
  return {"params": int(total), "unused_conv_seg_params": int(unused)}


# ----------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------

def _family(model_name: str) -> str:
  return model_name.split("_", 1)[0]


def _reference(model_name: str, height: int, width: int, batch: int) -> dict | None:
  """The model's row of shared/parity/figures.json at 512x512, when available."""
  if (height, width, batch) != (512, 512, 1):
    return None
  # <repo>/../shared next to this package's repository (module files are local).
  shared = os.environ.get("OFFSEG_SHARED") or epath.Path(__file__).resolve().parents[3] / "shared"
  path = epath.Path(shared) / "parity" / "figures.json"
  if not path.is_file():
    return None
  rows = {row["model"]: row for row in json.loads(path.read_text())}
  return rows.get(model_name)


def analyze(model_name: str, num_classes: int = 150, size=(512, 512), batch: int = 1,
            compile_xla: bool = True, model=None) -> dict[str, Any]:
  """Counts parameters and FLOPs of ``model_name``'s eval forward.

  Args:
    model_name: a registered model (built with ``build_model`` unless ``model``
      is given).
    num_classes: classes of the head.
    size: input (height, width).
    batch: images per forward (FLOP figures are for the whole batch).
    compile_xla: also compile the forward for XLA's cost analysis (slow for
      big models on CPU); the conv/matmul counts only trace it.
    model: an already built module to analyse instead.
  """
  if model is None:
    model = models.build_model({"name": model_name}, num_classes)
  height, width = int(size[0]), int(size[1])
  jaxpr, variables, forward, images = trace_forward(model, (height, width), batch)
  notes: set[str] = set()
  counts = forward_macs(jaxpr, notes)
  params = param_counts(variables["params"])
  result: dict[str, Any] = {
      "model": model_name, "num_classes": num_classes, "input": [batch, height, width, 3],
      "params_M": params["params"] / 1e6,
      "params_without_unused_conv_seg_M":
          (params["params"] - params["unused_conv_seg_params"]) / 1e6,
      "unused_conv_seg_params": params["unused_conv_seg_params"],
      "conv_gmacs": counts.conv / 1e9,
      "matmul_gmacs": counts.matmul / 1e9,
      "conventions": {
          "xla_gflops": "XLA cost analysis: 1 multiply-add = 2 FLOPs, elementwise ops "
                        "1 FLOP, padded taps skipped",
          "xla_gmacs": "xla_gflops / 2: 1 MAC = 1 FLOP",
          "conv_gmacs": "multiply-adds of the convolutions of the official code, padded "
                        "taps included",
          "matmul_gmacs": "conv_gmacs + matrix-product (dot_general) multiply-adds",
      },
      "notes": sorted(notes),
  }
  if compile_xla:
    flops = xla_flops(forward, variables, images)
    result["xla_gflops"] = flops / 1e9
    result["xla_gmacs"] = flops / 2e9
  convention = PAPER_CONVENTIONS.get(_family(model_name))
  if convention:
    result["paper_convention"] = convention[1]
    result["paper_gflops"] = paper_gmacs(model_name, counts)
  reference = _reference(model_name, height, width, batch)
  if reference:
    result["reference_512x512"] = reference
  return result


def format_report(r: dict[str, Any]) -> str:
  """Human-readable lines of an :func:`analyze` result."""
  lines = [f"{r['model']} ({r['num_classes']} classes), input {'x'.join(map(str, r['input']))}",
           f"  params: {r['params_M']:.3f} M ({r['params_without_unused_conv_seg_M']:.3f} M "
           f"without the unused conv_seg: {r['unused_conv_seg_params']:,})"]
  if "xla_gflops" in r:
    lines.append(f"  XLA: {r['xla_gflops']:.3f} GFLOPs (1 multiply-add = 2 FLOPs) = "
                 f"{r['xla_gmacs']:.3f} GMACs (1 MAC = 1 FLOP)")
  lines.append(f"  conv-only: {r['conv_gmacs']:.4f} GMACs; conv + matmul: "
               f"{r['matmul_gmacs']:.4f} GMACs")
  if "paper_gflops" in r:
    lines.append(f"  paper convention: {r['paper_gflops']:.3f} GFLOPs ({r['paper_convention']})")
  ref = r.get("reference_512x512")
  if ref:
    figures = ref.get("ade20k_1x3x512x512", {})
    lines.append(f"  published: {ref.get('paper_params_M')} M params, "
                 f"{figures.get('paper_gflops')} GFLOPs; official counts: conv-only "
                 f"{figures.get('gmacs_conv_only')} GMACs, all matmul-like "
                 f"{figures.get('gmacs_all')} GMACs, mmengine {figures.get('mmengine_gflops')}")
  for note in r.get("notes", []):
    lines.append(f"  note: {note}")
  return "\n".join(lines)


def _input_size(size: Sequence[str]) -> tuple[int, int] | None:
  """``--size`` as (H, W): ``H,W`` or one number for a square; None if malformed."""
  try:
    hw = tuple(int(v) for v in size)
  except ValueError:
    return None
  hw = hw * 2 if len(hw) == 1 else hw
  return hw if len(hw) == 2 and min(hw) > 0 else None


def define_flags(values: flags.FlagValues = flags.FLAGS) -> None:
  """The command's flags, on ``values`` (defined only when it runs)."""
  on = {"flag_values": values}
  flags.DEFINE_string("model", None, "Registered model name.", required=True, **on)
  flags.DEFINE_integer("num_classes", 150, "Classes of the head.", **on)
  flags.DEFINE_list("size", ["512", "512"], "Input H,W (one number: a square).", **on)
  flags.DEFINE_integer("batch", 1, "Images per forward (FLOPs are for the batch).", **on)
  flags.DEFINE_bool("xla", True, "Also compile for XLA's cost analysis (--noxla: "
                    "trace-only counts).", **on)
  flags.DEFINE_bool("json", False, "Print one JSON object.", **on)
  flags.register_validator("model", cli.in_registry(MODELS), **on)
  flags.register_validator("size", lambda v: _input_size(v) is not None,
                           "give H,W or one size, positive integers (e.g. --size=512,1024)",
                           **on)


def command(argv: Sequence[str], values: flags.FlagValues = flags.FLAGS) -> int:
  """Prints the counts of ``--model`` as the flags say; returns the exit status."""
  cli.positional(argv, usage="python -m offseg_jax.tools.complexity --model=NAME "
                 "[--size=H,W] [--num_classes=N] [--noxla] [--json]")
  result = analyze(values.model, values.num_classes, _input_size(values.size), values.batch,
                   compile_xla=values.xla)
  print(json.dumps(result) if values.json else format_report(result))
  return 0


# main([...]): the command in this process, e.g. from tests and notebooks.
main = cli.in_process(define_flags, command)


if __name__ == "__main__":
  cli.run(command, define_flags)
