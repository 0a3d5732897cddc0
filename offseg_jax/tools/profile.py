r"""Where the time of a training step goes: top XLA ops, forward and backward.

  python -m offseg_jax.tools.profile --config=experiments/configs/segformer_ol.py:b0_ol,ade20k \
      --batch=2 --size=512 [--top=25] [--steps=3] [--group=op|module|kind] [--json=out.json]
  python -m offseg_jax.tools.profile --config=experiments/configs/default.py:tiny \
      --batch=2 --size=64 --config.model.dtype=bfloat16
  python -m offseg_jax.tools.profile --config=experiments/configs/offseg.py:t,ade20k --ab \
      --steps=5                 # A/B against the reference forms, then the tables

Builds exactly the trainer's step (``train.make_init_state`` and
``train.config_train_step``: model, optimizer with parameter groups, losses,
uint8 images normalised on device) for a random batch of ``--batch`` crops of
``--size``, plus the inference forward (``model.apply(train=False)``), compiles
both, times them (median of ``--steps`` untraced calls after ``--warmup``), then
runs ``--steps`` more under ``jax.profiler.trace`` and reads the trace.

XLA's CPU runtime records one trace event per executed HLO op ("thunk": a
fusion, a convolution, a dot, a scatter...) with the op's name (``hlo_op``
stat). Each op is looked up in the compiled module's HLO text, whose metadata
``op_name`` is the jax name stack of the operation it came from, e.g.
``jit(train_step)/transpose(jvp(EncoderDecoder))/backbone/layers.0.1.0/attn/
attn/dot_general``. From it:

* phase: ``backward`` when the name stack holds ``transpose(`` (the VJP of the
  loss), ``forward`` when it holds ``jvp(`` only (model forward and loss),
  ``optimizer`` otherwise (AdamW update, gradient norm, metrics);
* module: the flax module path (``backbone/layers.0.1.0/attn``, ``loss`` for
  ops outside the model);
* kind: the dominant HLO op inside the fusion (convolution > dot > scatter >
  gather > select-and-scatter > reduce-window > sort > reduce > transpose/copy
  > elementwise);
* primitive: the jax primitive, prefixed by the jitted jax function it ran in,
  e.g. ``_take:scatter-add`` (the gradient of a ``jnp.take``).

Tables (``--group=op``, default) list one row per (kind, module, primitive), with
milliseconds per step and the share of the phase and of the step; times are the
summed op durations (on a busy or multi-threaded host, ops can overlap or wait, so
the sum differs from wall time: the wall time is printed too).
``--group=module`` sums each module's ops, ``--group=kind`` each HLO kind.

XLA's CPU passes drop the metadata of some ops they create (the kernel gradient
of a convolution, layout copies). A star marks what is inferred: ``conv*`` in
the primitive column is an op whose dominant HLO op carries no name (the row
shows the name of an op fused with it), ``module*`` a module taken from the op's
nearest named inputs (a kernel gradient's output-gradient input, typically the
norm after the conv: ``.../fuse/bn*`` for the ``.../fuse/conv`` kernel).

``--ab`` first times the reference formulations (``layers.reference_forms``:
the program before the rewrites of docs/performance.md) against the current
ones, both compiled in this process and called alternately, and prints the
medians and their ratio; ``--reference`` profiles the reference forms.

Everything runs on the first local device; on GPU/TPU the trace holds device ops
under other names (this parser targets the CPU runtime; it reports an empty
table where it finds no ``hlo_op`` events).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import os
import re
import statistics
import tempfile
import time
from typing import Any, Sequence

from absl import app, flags, logging
from etils import epath
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

from input_pipeline import datasets, loader, storage
from offseg_jax import cli, losses, optim, train
from offseg_jax.tools import benchmark
from offseg_jax.models import construction, layers

FLAGS = flags.FLAGS

PHASES = ("forward", "backward", "optimizer")

# Dominant HLO opcodes, heaviest first: a fusion is named after the first of these
# it contains.
_KIND_PRIORITY = ("convolution", "dot", "custom-call", "scatter", "gather",
                  "select-and-scatter", "reduce-window", "sort", "reduce",
                  "dynamic-update-slice", "dynamic-slice", "transpose", "copy",
                  "concatenate", "pad", "slice", "broadcast", "iota")
_CONTROL = ("while", "conditional", "call", "async-start", "async-done")
_ELEMENTWISE = "elementwise"


# ----------------------------------------------------------------------------
# HLO text.
# ----------------------------------------------------------------------------

@dataclasses.dataclass
class Instruction:
  name: str
  opcode: str
  op_name: str
  calls: tuple[str, ...]
  shape: str
  operands: tuple[str, ...] = ()


_COMP_HEADER = re.compile(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_CALLS = re.compile(r"\b(?:calls|to_apply|body|condition)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_OP_NAME = re.compile(r'op_name="([^"]*)"')


def _split_type(rest: str) -> tuple[str, str]:
  """``'f32[2]{0} add(%a, %b), ...'`` -> (``'f32[2]{0}'``, ``'add(%a, %b), ...'``)."""
  rest = rest.strip()
  if rest.startswith("("):
    depth = 0
    for i, ch in enumerate(rest):
      depth += ch == "("
      depth -= ch == ")"
      if depth == 0:
        return rest[:i + 1], rest[i + 1:].strip()
  parts = rest.split(" ", 1)
  return parts[0], (parts[1] if len(parts) > 1 else "")


def _operands(text: str) -> tuple[str, ...]:
  """Operand names of ``'%a, %b), attrs'`` (the text after the opcode's '(')."""
  depth, end = 1, len(text)
  for i, ch in enumerate(text):
    depth += (ch == "(") - (ch == ")")
    if depth == 0:
      end = i
      break
  return tuple(re.findall(r"%([\w.\-]+)", text[:end]))


def parse_hlo(text: str) -> tuple[dict[str, Instruction], dict[str, list[str]]]:
  """``(instructions by name, instruction names by computation)`` of HLO text."""
  instructions: dict[str, Instruction] = {}
  computations: dict[str, list[str]] = {}
  current = None
  for line in text.splitlines():
    header = _COMP_HEADER.match(line)
    if header and "=" not in line.split("(", 1)[0]:
      current = header.group(1)
      computations[current] = []
      continue
    if line.strip() == "}":
      current = None
      continue
    m = _INSTR.match(line)
    if not m or current is None:
      continue
    name, rest = m.group(1), m.group(2)
    shape, rest = _split_type(rest)
    op = re.match(r"([\w\-]+)\(", rest)
    if not op:
      continue
    calls = list(_CALLS.findall(rest))
    for group in _BRANCHES.findall(rest):
      calls += [c.strip().lstrip("%") for c in group.split(",") if c.strip()]
    op_name = _OP_NAME.search(rest)
    instructions[name] = Instruction(name, op.group(1), op_name.group(1) if op_name else "",
                                     tuple(calls), shape, _operands(rest[op.end():]))
    computations[current].append(name)
  return instructions, computations


def _inner(name: str, instructions, computations, depth: int = 0) -> list[Instruction]:
  """The instructions of every computation ``name`` calls (recursively)."""
  out = []
  if depth > 8:
    return out
  for comp in instructions[name].calls:
    for inner in computations.get(comp, ()):
      out.append(instructions[inner])
      if instructions[inner].calls:
        out += _inner(inner, instructions, computations, depth + 1)
  return out


def _primitive(op_name: str) -> str:
  """The jax primitive of a name stack, prefixed by the innermost jitted
  function it ran in (``'_take:gather'``, ``'log_softmax:exp'``)."""
  if not op_name:
    return ""
  parts = op_name.split("/")
  for part in reversed(parts[1:-1]):
    m = re.fullmatch(r"(?:jvp\()*(?:transpose\()*(?:jvp\()*jit\(([\w.<>\-]+)\)\)*", part)
    if m:
      return f"{m.group(1)}:{parts[-1]}"
    if not part.startswith(("jit(", "jvp(", "transpose(")) and part not in _SCAFFOLD:
      break
  return parts[-1]


def classify_instruction(name: str, instructions,
                         computations) -> tuple[str, str, bool]:
  """``(kind, op_name, exact)`` of an executed op: its dominant HLO opcode, the jax
  name stack, and whether that name is the dominant op's own (else it is the
  name of another op fused with it, or '' when nothing in it is named)."""
  ins = instructions[name]
  body = _inner(name, instructions, computations) if ins.opcode == "fusion" else []
  candidates = [ins] + body
  for kind in _KIND_PRIORITY:
    hits = [c for c in candidates if c.opcode == kind]
    if hits:
      named = [c.op_name for c in hits if c.op_name]
      if named:
        return kind, named[0], True
      return kind, ins.op_name or _any_op_name(candidates), False
  return _ELEMENTWISE, ins.op_name or _any_op_name(candidates), True


def _inherited_op_name(name: str, instructions, computations, cache,
                       max_depth: int = 6) -> str:
  """The name stack of the nearest named producers of an op XLA left unnamed.

  XLA's CPU passes drop the metadata of some ops they create (e.g. the kernel
  gradient of a convolution rewritten as another convolution, layout copies).
  Such an op belongs where its inputs come from: the nearest operands (breadth
  first) that carry a name, preferring a backward one (a kernel gradient reads a
  forward activation and a backward output gradient).
  """
  if name in cache:
    return cache[name]
  cache[name] = ""                       # cycles (never in HLO) and re-entry
  frontier, seen = [name], {name}
  for _ in range(max_depth):
    found, nxt = [], []
    for op in frontier:
      for operand in instructions[op].operands if op in instructions else ():
        if operand in seen or operand not in instructions:
          continue
        seen.add(operand)
        _, op_name, _ = classify_instruction(operand, instructions, computations)
        if op_name and "jit(" in op_name:
          found.append(op_name)
        else:
          nxt.append(operand)
    if found:
      backward = [n for n in found if "transpose(" in n]
      cache[name] = (backward or found)[0]
      break
    frontier = nxt
  return cache[name]


def _any_op_name(candidates: Sequence[Instruction]) -> str:
  names = collections.Counter(c.op_name for c in candidates if c.op_name)
  return names.most_common(1)[0][0] if names else ""


def phase_of(op_name: str) -> str:
  """``forward`` / ``backward`` / ``optimizer`` from a jax name stack."""
  if "transpose(" in op_name:
    return "backward"
  if "jvp(" in op_name:
    return "forward"
  return "optimizer"


_WRAPPER = re.compile(r"^[\w]+\((.*)\)$")      # jvp(X), transpose(jvp(X)), jit(f)...
_SCAFFOLD = ("while", "body", "cond", "closed_call", "checkpoint", "remat", "rematted_computation")


def _peel(part: str) -> str:
  """``'transpose(jvp(EncoderDecoder))'`` -> ``'EncoderDecoder'``."""
  while True:
    m = _WRAPPER.match(part)
    if not m:
      return part
    part = m.group(1)


def module_of(op_name: str) -> str:
  """The flax module path in a name stack.

  ``jit(train_step)/transpose(jvp(EncoderDecoder))/backbone/layers.0.1.0/attn/
  dot_general`` -> ``backbone/layers.0.1.0/attn``. Ops outside the model are
  ``loss`` (inside the differentiated function: resize and cross-entropy) or
  ``step`` (input normalisation, optimizer, metrics).
  """
  if not op_name:
    return "?"
  parts = op_name.split("/")[:-1]          # the last part is the primitive
  start = None
  for i, part in enumerate(parts):
    inner = _peel(part)
    if inner and inner[0].isupper() and not part.startswith("jit("):
      start = i + 1                          # the model's top-level module scope
      break
  if start is None:
    return "loss" if "jvp(" in op_name else "step"
  path = [p for p in parts[start:]
          if _peel(p) == p and p not in _SCAFFOLD and p]
  return "/".join(path) or "model"


# ----------------------------------------------------------------------------
# Trace.
# ----------------------------------------------------------------------------

def trace_op_events(trace_dir: str) -> list[tuple[str, str, float]]:
  """``[(hlo_module, hlo_op, duration_ms)]`` of every HLO op event in a trace."""
  from jax.profiler import ProfileData  # pylint: disable=g-import-not-at-top
  out = []
  paths = [directory / name for directory, _, names in storage.walk(trace_dir)
           for name in names if name.endswith(".xplane.pb")]
  for path in paths:
    data = ProfileData.from_serialized_xspace(path.read_bytes())
    for plane in data.planes:
      for line in plane.lines:
        for event in line.events:
          stats = dict(event.stats)
          op = stats.get("hlo_op")
          if op is None:
            continue
          out.append((str(stats.get("hlo_module", "")), str(op), event.duration_ns / 1e6))
  return out


def module_name(hlo_text: str) -> str:
  m = re.match(r"\s*HloModule\s+([\w.\-]+)", hlo_text)
  return m.group(1) if m else ""


def attribute(events, hlo_text: str, steps: int) -> list[dict[str, Any]]:
  """One record per executed op of ``hlo_text``'s module: name, kind, phase,
  module, primitive and milliseconds per step (summed over the trace / steps)."""
  instructions, computations = parse_hlo(hlo_text)
  want = module_name(hlo_text)
  per_op: dict[str, float] = collections.defaultdict(float)
  for mod, op, ms in events:
    if mod == want and op in instructions:
      per_op[op] += ms
  records, cache = [], {}
  for op, ms in per_op.items():
    ins = instructions[op]
    if ins.opcode in _CONTROL and ins.calls:
      continue                               # its body's ops are counted themselves
    kind, op_name, exact = classify_instruction(op, instructions, computations)
    inferred = not op_name
    if inferred:
      op_name = _inherited_op_name(op, instructions, computations, cache)
    # Fusions of ops with different names join them with ';': keep the first.
    op_name = op_name.split(";", 1)[0]
    records.append({"hlo_op": op, "kind": kind,
                    "primitive": _primitive(op_name) if exact and not inferred else f"{kind}*",
                    "phase": phase_of(op_name),
                    "module": module_of(op_name) + ("*" if inferred else ""),
                    "op_name": op_name, "ms": ms / max(steps, 1)})
  return records


def group_records(records, by: str = "op") -> list[dict[str, Any]]:
  """Sums records per (phase, key); ``by``: 'op' (kind+module+primitive),
  'module' or 'kind'. Sorted by time, largest first."""
  keys = {"op": ("kind", "module", "primitive"), "module": ("module",),
          "kind": ("kind", "primitive")}[by]
  sums: dict[tuple, dict[str, Any]] = {}
  for r in records:
    key = (r["phase"],) + tuple(r[k] for k in keys)
    row = sums.setdefault(key, dict({"phase": r["phase"], "ms": 0.0, "count": 0},
                                    **{k: r[k] for k in keys}))
    row["ms"] += r["ms"]
    row["count"] += 1
  return sorted(sums.values(), key=lambda row: -row["ms"])


def format_table(rows, phase: str, top: int, step_ms: float, by: str = "op") -> str:
  """A readable table of one phase's ``top`` rows."""
  rows = [r for r in rows if r["phase"] == phase]
  total = sum(r["ms"] for r in rows)
  out = [f"{phase}: {total:.1f} ms of op time per step "
         f"({100 * total / max(step_ms, 1e-9):.1f} % of all ops), {len(rows)} rows"]
  cols = {"op": ("kind", "module", "primitive"), "module": ("module",),
          "kind": ("kind", "primitive")}[by]
  widths = {"kind": 22, "module": 46, "primitive": 26}
  head = "  ".join(f"{c:<{widths[c]}}" for c in cols)
  out.append(f"  {head}  {'ms':>9} {'phase%':>7} {'step%':>6} {'ops':>4}")
  for r in rows[:top]:
    cells = "  ".join(f"{_clip(str(r[c]), widths[c]):<{widths[c]}}" for c in cols)
    out.append(f"  {cells}  {r['ms']:>9.2f} {100 * r['ms'] / max(total, 1e-9):>6.1f}% "
               f"{100 * r['ms'] / max(step_ms, 1e-9):>5.1f}% {r['count']:>4}")
  if any("*" in str(r.get(c, "")) for r in rows[:top] for c in cols):
    out.append("  (* inferred: the op carries no name of its own; see the module docstring)")
  if len(rows) > top:
    rest = sum(r["ms"] for r in rows[top:])
    out.append(f"  ({len(rows) - top} more rows: {rest:.1f} ms, "
               f"{100 * rest / max(total, 1e-9):.1f} %)")
  return "\n".join(out)


def _clip(text: str, width: int) -> str:
  return text if len(text) <= width else "…" + text[-(width - 1):]


# ----------------------------------------------------------------------------
# The step.
# ----------------------------------------------------------------------------

def _step_ms(fn, steps: int, warmup: int) -> list[float]:
  """Wall milliseconds of each of ``steps`` calls of ``fn`` after ``warmup`` calls."""
  return [t * 1e3 for t in benchmark.step_times(fn, steps, warmup)]


def build(config, *, batch: int, size: Sequence[int]):
  """``(train_step, forward, state, batch, config)``: the trainer's step (jitted,
  not yet traced) on a random batch of ``batch`` crops of ``size``, the
  inference forward, a fresh train state, the batch and the config used."""
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.batch_size = int(batch)
    config.grad_accum_steps = int(config.get("grad_accum_steps", 1))
    config.data.crop_size = tuple(int(v) for v in size)
  info = datasets.dataset_info(config.data)
  model = construction.create_model(config, info.num_classes)
  rng = jax.random.PRNGKey(int(config.get("seed", 0)))
  init_rng, state_rng, _ = jax.random.split(rng, 3)
  abstract_vars = jax.eval_shape(functools.partial(construction.init_variables, model, config),
                                 init_rng)
  tx, schedule = optim.build_optimizer(config, abstract_vars["params"])
  loss_fn = losses.build_loss({k: dict(v) for k, v in config.losses.items()})
  state = jax.jit(train.make_init_state(model, config, tx, state_rng))(init_rng)

  data_rng = np.random.default_rng(0)
  batch_arrays = {}
  for key, (shape, dtype) in loader.batch_spec(config).items():
    if key == "label":
      value = data_rng.integers(0, info.num_classes, shape)
      value[:, : shape[1] // 8] = 255                # some ignored pixels
    elif key == "valid_hw":
      value = np.tile(np.asarray(config.data.crop_size), (shape[0], 1))
    elif np.issubdtype(dtype, np.integer):
      value = data_rng.integers(0, 256, shape)
    else:
      value = data_rng.standard_normal(shape)
    batch_arrays[key] = jnp.asarray(value.astype(dtype))

  train_step = jax.jit(train.config_train_step(config, model, tx, loss_fn, schedule))
  mean, std = tuple(config.data.mean), tuple(config.data.std)

  def forward(variables, batch):
    images, _ = loader.device_batch(batch, mean, std)
    logits, _ = model.apply(variables, images, train=False, rngs={"ham": rng})
    return logits

  return train_step, jax.jit(forward), state, batch_arrays, config


@dataclasses.dataclass
class Programs:
  """The compiled train step and inference forward with their inputs."""
  train: Any
  forward: Any
  state: Any
  batch: Any
  config: Any
  train_compile_s: float
  forward_compile_s: float

  @property
  def variables(self):
    return {"params": self.state["params"], "batch_stats": self.state["batch_stats"]}

  def run_train(self):
    return self.train(self.state, self.batch)[1]["loss"]

  def run_forward(self):
    return self.forward(self.variables, self.batch)


def compile_programs(config, *, batch: int, size: Sequence[int],
                     reference: bool = False) -> Programs:
  """Builds and compiles the programs (``reference``: with the reference
  formulations of ``layers.reference_forms``, i.e. before the CPU rewrites)."""
  step_fn, forward_fn, state, batch_arrays, config = build(config, batch=batch, size=size)
  variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
  with layers.reference_forms(reference):
    start = time.perf_counter()
    step_c = step_fn.lower(state, batch_arrays).compile()
    train_compile_s = time.perf_counter() - start
    start = time.perf_counter()
    fwd_c = forward_fn.lower(variables, batch_arrays).compile()
    forward_compile_s = time.perf_counter() - start
  return Programs(step_c, fwd_c, state, batch_arrays, config, train_compile_s,
                  forward_compile_s)


def _setting(config, batch: int) -> dict[str, Any]:
  device = jax.local_devices()[0]
  return {"model": config.model.name, "dtype": str(config.model.get("dtype", "float32")),
          "batch": int(batch), "size": [int(v) for v in config.data.crop_size],
          "device": device.device_kind, "platform": device.platform,
          "cpu_count": os.cpu_count(), "jax": jax.__version__}


def profile(config, *, batch: int = 2, size: Sequence[int] = (512, 512), steps: int = 3,
            warmup: int = 1, trace_dir: str | None = None, forward_ops: bool = True,
            reference: bool = False, programs: Programs | None = None,
            say=print) -> dict[str, Any]:
  """Compiles, times and traces the train step and the inference forward.

  Returns a JSON-able dict: setting, ``train_ms`` / ``forward_ms`` (per-call wall
  times of the untraced runs), ``train_records`` / ``forward_records`` (one per
  executed HLO op, see :func:`attribute`). ``programs`` reuses compiled ones.
  """
  p = programs or compile_programs(config, batch=batch, size=size, reference=reference)
  say(f"compiled{' (reference forms)' if reference else ''}: train step "
      f"{p.train_compile_s:.1f} s, forward {p.forward_compile_s:.1f} s")
  train_ms = _step_ms(p.run_train, steps, warmup)
  forward_ms = _step_ms(p.run_forward, steps, warmup) if forward_ops else []

  own_dir = trace_dir is None
  trace_dir = trace_dir or tempfile.mkdtemp(prefix="offseg_profile_")
  try:
    with jax.profiler.trace(trace_dir):
      for _ in range(steps):
        jax.block_until_ready(p.run_train())
      if forward_ops:
        for _ in range(steps):
          jax.block_until_ready(p.run_forward())
    events = trace_op_events(trace_dir)
  finally:
    if own_dir:
      epath.Path(trace_dir).rmtree(missing_ok=True)
  train_records = attribute(events, p.train.as_text(), steps)
  forward_records = attribute(events, p.forward.as_text(), steps) if forward_ops else []
  for r in forward_records:
    r["phase"] = "inference"
  return dict(_setting(p.config, batch), steps=int(steps), reference=bool(reference),
              train_ms=train_ms, forward_ms=forward_ms,
              train_compile_s=p.train_compile_s, forward_compile_s=p.forward_compile_s,
              train_records=train_records, forward_records=forward_records)


def compare(config, *, batch: int = 2, size: Sequence[int] = (512, 512), repeats: int = 5,
            warmup: int = 1, forward_ops: bool = True, say=print) -> dict[str, Any]:
  """A/B: the reference formulations against the current ones, in one process.

  Both programs are compiled, then called alternately (reference, current,
  reference, ...) ``repeats`` times after ``warmup`` calls each, so that load
  from other processes hits both alike. Returns the per-call milliseconds of
  each, their medians and the speed-up ``reference / current`` of the medians.
  """
  ref = compile_programs(config, batch=batch, size=size, reference=True)
  cur = compile_programs(config, batch=batch, size=size, reference=False)
  say(f"compiled: reference step {ref.train_compile_s:.1f} s, current step "
      f"{cur.train_compile_s:.1f} s")
  out = dict(_setting(cur.config, batch), repeats=int(repeats))
  kinds = [("train", "run_train")] + ([("forward", "run_forward")] if forward_ops else [])
  for kind, method in kinds:
    runs = {"reference": getattr(ref, method), "current": getattr(cur, method)}
    for fn in runs.values():
      for _ in range(warmup):
        jax.block_until_ready(fn())
    times = {name: [] for name in runs}
    for _ in range(max(repeats, 1)):
      for name, fn in runs.items():
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times[name].append((time.perf_counter() - start) * 1e3)
    med = {name: statistics.median(t) for name, t in times.items()}
    out[kind] = {"reference_ms": times["reference"], "current_ms": times["current"],
                 "reference_median_ms": med["reference"], "current_median_ms": med["current"],
                 "speedup": med["reference"] / med["current"]}
  return out


def format_compare(r: dict[str, Any]) -> str:
  h, w = r["size"]
  lines = [f"A/B {r['model']} {r['dtype']}, batch {r['batch']} x {h}x{w}, {r['platform']} "
           f"({r['cpu_count']} cores): reference forms vs current, interleaved, median of "
           f"{r['repeats']}"]
  for kind in ("train", "forward"):
    if kind in r:
      k = r[kind]
      lines.append(f"  {kind:<8} reference {k['reference_median_ms']:9.1f} ms   current "
                   f"{k['current_median_ms']:9.1f} ms   speed-up x{k['speedup']:.2f}   "
                   f"(reference {', '.join(f'{t:.0f}' for t in k['reference_ms'])}; current "
                   f"{', '.join(f'{t:.0f}' for t in k['current_ms'])})")
  return "\n".join(lines)


def format_report(result: dict[str, Any], *, top: int = 25, by: str = "op") -> str:
  """Timings, then the forward, backward and optimizer tables of the train step
  (and the inference forward's)."""
  h, w = result["size"]
  med = statistics.median(result["train_ms"])
  forms = " (reference forms)" if result.get("reference") else ""
  lines = [f"{result['model']} {result['dtype']}{forms}, batch {result['batch']} x {h}x{w}, "
           f"{result['platform']} ({result['device']}, {result['cpu_count']} cores), "
           f"jax {result['jax']}",
           f"train step: {med:.1f} ms wall (median of {len(result['train_ms'])}: "
           f"{', '.join(f'{t:.0f}' for t in result['train_ms'])})"]
  if result["forward_ms"]:
    lines.append(f"inference forward: {statistics.median(result['forward_ms']):.1f} ms wall "
                 f"(median of {len(result['forward_ms'])})")
  rows = group_records(result["train_records"], by)
  total = sum(r["ms"] for r in rows)
  split = {p: sum(r["ms"] for r in rows if r["phase"] == p) for p in PHASES}
  lines.append(f"train step op time {total:.1f} ms per step: " + ", ".join(
      f"{p} {v:.1f} ms ({100 * v / max(total, 1e-9):.0f} %)" for p, v in split.items()))
  for phase in PHASES:
    lines += ["", format_table(rows, phase, top, total, by)]
  if result["forward_records"]:
    rows = group_records(result["forward_records"], by)
    ftotal = sum(r["ms"] for r in rows)
    lines += ["", format_table(rows, "inference", top, ftotal, by)]
  return "\n".join(lines)


def define_flags():
  """Command-line flags (defined only when run as a program)."""
  config_flags.DEFINE_config_file("config", None, "Experiment config: path.py[:arg].",
                                  lock_config=True)
  flags.DEFINE_integer("batch", 2, "Training batch (crops).", lower_bound=1)
  flags.DEFINE_list("size", ["512"], "Crop H[,W] (default 512).")
  flags.DEFINE_integer("top", 25, "Rows per table.")
  flags.DEFINE_integer("steps", 3, "Timed and traced calls of each program (A/B: repeats).",
                       lower_bound=1)
  flags.DEFINE_integer("warmup", 1, "Untimed calls after compilation.", lower_bound=0)
  flags.DEFINE_enum("group", "op", ["op", "module", "kind"],
                    "Table rows: kind+module+primitive, module, or kind.")
  flags.DEFINE_bool("forward", True, "Also profile the inference forward.")
  flags.DEFINE_bool("reference", False,
                    "Profile the reference formulations (layers.reference_forms: gather "
                    "resizes, reduce_window max pool, 1x1 convolutions as convolutions).")
  flags.DEFINE_bool("ab", False, "First time the reference against the current "
                    "formulations, interleaved in this process (--steps repeats).")
  flags.DEFINE_bool("tables", True, "Trace and print the op tables (--notables: A/B only).")
  flags.DEFINE_string("trace_dir", None, "Keep the trace here (TensorBoard/xprof readable).")
  flags.DEFINE_string("json", None, "Also write the results to this JSON file.")
  flags.mark_flag_as_required("config")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  size = [int(v) for v in FLAGS.size]
  size = size * 2 if len(size) == 1 else size[:2]
  results = {}
  if FLAGS.ab:
    results["ab"] = compare(FLAGS.config, batch=FLAGS.batch, size=size, repeats=FLAGS.steps,
                            warmup=FLAGS.warmup, forward_ops=FLAGS.forward)
    print(format_compare(results["ab"]), flush=True)
  if FLAGS.tables:
    results["profile"] = profile(FLAGS.config, batch=FLAGS.batch, size=size,
                                 steps=FLAGS.steps, warmup=FLAGS.warmup,
                                 trace_dir=FLAGS.trace_dir, forward_ops=FLAGS.forward,
                                 reference=FLAGS.reference)
    print(format_report(results["profile"], top=FLAGS.top, by=FLAGS.group), flush=True)
  if FLAGS.json:
    epath.Path(FLAGS.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
  define_flags()
  cli.run(main)
