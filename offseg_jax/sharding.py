"""Device meshes, the batch layout on them, and the placement of the train state.

Three things the trainer, the ahead-of-time tool and the tests share:

* the mesh (:func:`make_mesh`): named axes from ``config.mesh.shape`` /
  ``config.mesh.axes``, e.g. ``(-1, 2)`` over ``('data', 'fsdp')``;
* the batch layout (:func:`batch_axes`, :func:`batch_partition`,
  :func:`batch_sharding`, :func:`check_batch_split`): the batch dimension is
  split over ``config.mesh.batch_axes`` (default: every axis of the mesh, so
  with ``('data', 'fsdp')`` every device holds its own examples, as FSDP data
  parallelism does); no axis name is hard-coded;
* the state placement (:func:`state_shardings`): an ordered list of
  ``(regex, rule)`` pairs over parameter paths, first match wins:

  - ``'replicate'``: a full copy on every device;
  - ``'fsdp'`` / ``'fsdp:<axis>'`` / ``'fsdp:<axis>,<axis>'``: the largest
    dimension divisible by the axis size (the product for several axes) is
    split over the axis (default axis ``'fsdp'``), for leaves of at least
    ``config.fsdp_min_size`` elements; smaller leaves are replicated (their
    all-gathers would cost more latency than their copies cost memory);
  - a PartitionSpec tuple, e.g. ``(None, None, None, 'fsdp')``: exactly that
    (entries for the leading dimensions; ``()`` replicates).

  Regexes are searched in the *parameter-relative* path, e.g.
  ``'backbone/stem/conv/kernel'`` (no ``'params/'`` prefix), and the optimizer
  moments of a parameter (optax ``mu``/``nu``, wherever the optimizer nests
  them) always take their parameter's placement, so a rule anchored as
  ``'^backbone/'`` places the parameter and its moments alike. Under
  ``jax.jit`` the sharded parameters are gathered where a layer needs them and
  their gradients reduce-scattered, both inserted by XLA (GSPMD): the step
  function itself is the same for every placement.
"""

from __future__ import annotations

import math
import re
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

REPLICATE = "replicate"
FSDP = "fsdp"
# Below this many elements a leaf stays replicated under an 'fsdp' rule: 2**14
# float32 values are 64 KiB, cheaper to keep than to all-gather every step.
DEFAULT_FSDP_MIN_SIZE = 2 ** 14


# ----------------------------------------------------------------------------
# Meshes.
# ----------------------------------------------------------------------------

def build_mesh(shape: Sequence[int], axes: Sequence[str], devices: Sequence[Any] | None = None,
               *, what: str = "config.mesh") -> Mesh:
  """A mesh of ``devices`` (default: all) with named axes; one ``-1`` in ``shape``
  takes the remaining devices.

  Errors are one line naming ``what.shape`` / ``what.axes`` and the device
  count. The axes are ``Auto`` (GSPMD propagates shardings), as training uses.
  """
  shape, axes = tuple(int(s) for s in shape), tuple(str(a) for a in axes)
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  if len(shape) != len(axes):
    raise ValueError(f"{what}.shape={shape} and {what}.axes={axes} differ in length")
  if len(set(axes)) != len(axes):
    raise ValueError(f"{what}.axes={axes} names an axis twice")
  if shape.count(-1) > 1:
    raise ValueError(f"{what}.shape={shape} has more than one -1")
  if any(s < 1 and s != -1 for s in shape):
    raise ValueError(f"{what}.shape={shape}: sizes must be positive (or one -1)")
  fixed = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if n % fixed:
      raise ValueError(f"{what}.shape={shape} does not fit {n} devices: {n} is not a "
                       f"multiple of {fixed}")
    shape = tuple(n // fixed if s == -1 else s for s in shape)
  elif fixed != n:
    raise ValueError(f"{what}.shape={shape} needs {fixed} devices, there are {n}")
  axis_types = (jax.sharding.AxisType.Auto,) * len(axes)
  try:
    # jax.make_mesh orders the devices by their physical topology (ICI rings on
    # TPU); it refuses some device subsets, which then keep their given order.
    return jax.make_mesh(shape, axes, axis_types=axis_types, devices=devices)
  except (ValueError, NotImplementedError, AssertionError):
    return Mesh(np.asarray(devices, dtype=object).reshape(shape), axes, axis_types=axis_types)


def make_mesh(config, devices: Sequence[Any] | None = None) -> Mesh:
  """The mesh of ``config.mesh`` (``shape`` with one -1, ``axes``) over ``devices``
  (default: all devices of all processes); see :func:`build_mesh`."""
  return build_mesh(config.mesh.shape, config.mesh.axes, devices)


# ----------------------------------------------------------------------------
# The batch on the mesh.
# ----------------------------------------------------------------------------

def batch_axes(config, mesh: Mesh | None = None) -> tuple[str, ...]:
  """The mesh axes the batch dimension is split over.

  ``config.mesh.batch_axes`` if set, else every axis of ``config.mesh.axes``
  (or of ``mesh`` for configs without a ``mesh`` field).
  """
  mesh_cfg = config.get("mesh") if hasattr(config, "get") else None
  all_axes = (tuple(mesh_cfg.axes) if mesh_cfg is not None and "axes" in mesh_cfg
              else tuple(mesh.axis_names) if mesh is not None else ())
  chosen = mesh_cfg.get("batch_axes") if mesh_cfg is not None else None
  if chosen is None:
    if not all_axes:
      raise ValueError("config.mesh.axes is not set and no mesh was given")
    return all_axes
  chosen = (chosen,) if isinstance(chosen, str) else tuple(str(a) for a in chosen)
  if not chosen:
    raise ValueError("config.mesh.batch_axes=() must name at least one mesh axis")
  unknown = [a for a in chosen if a not in all_axes]
  if unknown or len(set(chosen)) != len(chosen):
    raise ValueError(f"config.mesh.batch_axes={chosen} must be distinct axes of "
                     f"config.mesh.axes={all_axes}")
  return chosen


def batch_partition(config, mesh: Mesh | None = None) -> str | tuple[str, ...]:
  """The PartitionSpec entry of the batch dimension: one axis name, or a tuple
  of names (split over their product). Pass it as ``loader.to_global(batch,
  mesh, axis=batch_partition(config))``."""
  axes = batch_axes(config, mesh)
  return axes[0] if len(axes) == 1 else axes


def batch_sharding(mesh: Mesh, config) -> NamedSharding:
  """Sharding of a global batch: leading dimension over the batch axes, the
  rest replicated."""
  return NamedSharding(mesh, P(batch_partition(config, mesh)))


def batch_devices(config, mesh: Mesh) -> int:
  """How many ways the batch is split: the product of the batch axes' sizes."""
  axes = batch_axes(config, mesh)
  missing = [a for a in axes if a not in mesh.shape]
  if missing:
    raise ValueError(f"batch axes {axes} are not all axes of the mesh {dict(mesh.shape)}")
  return math.prod(int(mesh.shape[a]) for a in axes)


def check_batch_split(config, mesh: Mesh) -> None:
  """The global batch must split over the batch axes and the micro-batches.

  ``config.batch_size`` must be a multiple of the product of the batch axes'
  sizes times ``config.grad_accum_steps`` (every micro-batch is split over the
  same devices).
  """
  axes = batch_axes(config, mesh)
  devices = batch_devices(config, mesh)
  k = int(config.get("grad_accum_steps", 1))
  if k < 1:
    raise ValueError(f"config.grad_accum_steps must be >= 1, got {k}")
  b = int(config.batch_size)
  if b % devices:
    raise ValueError(f"config.batch_size={b} is not divisible by the {devices} devices "
                     f"of the batch mesh axes {axes} (mesh {dict(mesh.shape)})")
  if b % (devices * k):
    raise ValueError(f"config.batch_size={b} does not split into grad_accum_steps={k} "
                     f"micro-batches of a multiple of the {devices} devices of the batch "
                     f"mesh axes {axes}")


# ----------------------------------------------------------------------------
# State placement.
# ----------------------------------------------------------------------------

def path_str(path) -> str:
  """``'a/b/c'`` of a ``jax.tree_util`` key path (dict keys, attributes, indices)."""
  return "/".join(_key_names(path))


def _key_names(path) -> tuple[str, ...]:
  names = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        names.append(str(getattr(k, attr)))
        break
    else:
      names.append(str(k))
  return tuple(names)


class _Rule:
  """One ``(regex, rule)`` pair, checked against the mesh once."""

  def __init__(self, regex: str, rule: Any, mesh: Mesh):
    self.regex, self.rule = str(regex), rule
    try:
      self.pattern = re.compile(self.regex)
    except re.error as e:
      raise ValueError(f"sharding rule {self.describe()}: bad regex ({e})") from None
    self.kind, self.axes, self.spec = self._parse(rule, mesh)

  def describe(self) -> str:
    return f"({self.regex!r}, {self.rule!r})"

  def _parse(self, rule, mesh):
    if isinstance(rule, str):
      if rule == REPLICATE:
        return REPLICATE, (), None
      if rule == FSDP or rule.startswith(FSDP + ":"):
        axes = tuple(a.strip() for a in rule[len(FSDP) + 1:].split(",") if a.strip()) or (FSDP,)
        self._check_axes(axes, mesh)
        return FSDP, axes, None
      raise ValueError(f"sharding rule {self.describe()}: unknown rule {rule!r}; use "
                       f"'replicate', 'fsdp', 'fsdp:<axis>' or a PartitionSpec tuple")
    if isinstance(rule, (tuple, list, P)):
      spec = []
      for entry in rule:
        if entry is None:
          spec.append(None)
        elif isinstance(entry, str):
          spec.append(entry)
        elif isinstance(entry, (tuple, list)) and all(isinstance(a, str) for a in entry):
          spec.append(tuple(entry))
        else:
          raise ValueError(f"sharding rule {self.describe()}: PartitionSpec entry {entry!r} "
                           f"is not None, an axis name or a tuple of axis names")
      named = [a for e in spec if e is not None for a in ((e,) if isinstance(e, str) else e)]
      if len(set(named)) != len(named):
        raise ValueError(f"sharding rule {self.describe()} uses a mesh axis twice")
      self._check_axes(named, mesh)
      return "spec", (), tuple(spec)
    raise ValueError(f"sharding rule {self.describe()}: a rule is 'replicate', 'fsdp', "
                     f"'fsdp:<axis>' or a PartitionSpec tuple, got {type(rule).__name__}")

  def _check_axes(self, axes, mesh):
    unknown = [a for a in axes if a not in mesh.shape]
    if unknown:
      raise ValueError(f"sharding rule {self.describe()} names mesh axis "
                       f"{unknown[0]!r}, which the mesh {dict(mesh.shape)} does not have")

  def spec_for(self, name: str, shape: tuple[int, ...], mesh: Mesh, fsdp_min_size: int) -> P:
    """The PartitionSpec of a leaf ``name`` of ``shape`` under this rule."""
    if self.kind == REPLICATE or not shape:
      return P()
    if self.kind == FSDP:
      return self._fsdp(name, shape, mesh, fsdp_min_size)
    return self._explicit(name, shape, mesh)

  def _fsdp(self, name, shape, mesh, fsdp_min_size):
    n = math.prod(int(mesh.shape[a]) for a in self.axes)
    if math.prod(shape) < fsdp_min_size:
      return P()
    dims = [d for d, s in enumerate(shape) if s % n == 0]
    if not dims:
      raise ValueError(f"{name} {tuple(shape)}: sharding rule {self.describe()} finds no "
                       f"dimension divisible by mesh axis {_axes_text(self.axes)} of size {n}")
    # The largest divisible dimension (the last of equals: a kernel's output
    # features) gives the most even shards.
    d = max(dims, key=lambda i: (shape[i], i))
    entry = self.axes[0] if len(self.axes) == 1 else self.axes
    return P(*([None] * d + [entry]))

  def _explicit(self, name, shape, mesh):
    if len(self.spec) > len(shape):
      raise ValueError(f"{name} {tuple(shape)}: sharding rule {self.describe()} has "
                       f"{len(self.spec)} entries for {len(shape)} dimension(s)")
    for dim, entry in zip(shape, self.spec):
      if entry is None:
        continue
      axes = (entry,) if isinstance(entry, str) else entry
      n = math.prod(int(mesh.shape[a]) for a in axes)
      if dim % n:
        raise ValueError(f"{name} {tuple(shape)}: sharding rule {self.describe()} puts "
                         f"dimension {dim} on mesh axis {_axes_text(axes)} of size {n}, "
                         f"which does not divide it")
    return P(*self.spec)


def _axes_text(axes) -> str:
  return repr(axes[0]) if len(axes) == 1 else repr(tuple(axes))


def compile_rules(rules, mesh: Mesh) -> list[_Rule]:
  """Checks ``(regex, rule)`` pairs against ``mesh`` (rule forms, axis names)."""
  out = []
  for item in rules:
    if not isinstance(item, (tuple, list)) or len(item) != 2:
      raise ValueError(f"sharding rules are (regex, rule) pairs, got {item!r}")
    out.append(_Rule(item[0], item[1], mesh))
  return out


def leaf_spec(name: str, shape: Sequence[int], mesh: Mesh, rules,
              *, fsdp_min_size: int = DEFAULT_FSDP_MIN_SIZE) -> P:
  """The PartitionSpec of one parameter-relative path ``name`` of ``shape``:
  the first rule whose regex is found in ``name``; replicated if none is."""
  compiled = rules if rules and isinstance(rules[0], _Rule) else compile_rules(rules, mesh)
  for rule in compiled:
    if rule.pattern.search(name):
      return rule.spec_for(name, tuple(int(s) for s in shape), mesh, int(fsdp_min_size))
  return P()


def state_shardings(abstract_state, mesh: Mesh, rules, *,
                    fsdp_min_size: int = DEFAULT_FSDP_MIN_SIZE):
  """NamedShardings for every leaf of a train state (or of a bare params tree).

  Args:
    abstract_state: the state pytree (e.g. ``jax.eval_shape`` of the init): a
      mapping with ``'params'`` (and ``'batch_stats'``, ``'opt_state'``,
      ``'step'``, ``'rng'``), or a params tree on its own.
    mesh: the mesh.
    rules: ordered ``(regex, rule)`` pairs (see the module docstring); the
      first regex found in a leaf's parameter-relative path applies, unmatched
      leaves are replicated.
    fsdp_min_size: leaves with fewer elements stay replicated under 'fsdp'.

  Placement of the state's parts:

  * ``params/<path>`` and every other variable collection
    (``batch_stats/<path>``): the rules on ``<path>``;
  * optimizer state (any nesting): a leaf whose path ends in a parameter's
    path, with the parameter's shape (Adam's ``mu``/``nu``), takes that
    parameter's sharding, whatever the rules' anchoring; other non-scalar
    leaves (e.g. factored moments) get the rules on their path without the
    first key;
  * scalars (step, optimizer counts) and top-level leaves (rng) are replicated.

  Raises:
    ValueError: a rule that cannot apply, naming the leaf, the rule and the
      axis size (dimensions that do not divide, an 'fsdp' leaf above the
      threshold without a divisible dimension, an unknown axis, a malformed rule).
  """
  compiled = compile_rules(rules, mesh)
  min_size = int(fsdp_min_size)
  replicated = NamedSharding(mesh, P())

  def place(rel: tuple[str, ...], leaf) -> NamedSharding:
    shape = tuple(getattr(leaf, "shape", ()))
    if not shape:
      return replicated
    return NamedSharding(mesh, leaf_spec("/".join(rel), shape, mesh, compiled,
                                         fsdp_min_size=min_size))

  if not (isinstance(abstract_state, Mapping) and "params" in abstract_state):
    return jax.tree_util.tree_map_with_path(lambda p, x: place(_key_names(p), x),
                                            abstract_state)

  # Parameters first: their placements are what the optimizer moments copy.
  params: dict[tuple[str, ...], tuple[tuple[int, ...], NamedSharding]] = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(abstract_state["params"]):
    rel = _key_names(path)
    params[rel] = (tuple(leaf.shape), place(rel, leaf))

  def place_state(path, leaf):
    names = _key_names(path)
    shape = tuple(getattr(leaf, "shape", ()))
    if not shape or len(names) < 2:
      return replicated                 # step, counts, rng: bookkeeping
    if names[0] == "params":
      return params[names[1:]][1]
    # The longest suffix that is a parameter's path: optax nests a moment under
    # its transform's state (inner_states/<group>/inner_state/0/mu/<param path>).
    for i in range(1, len(names)):
      hit = params.get(names[i:])
      if hit is not None and hit[0] == shape:
        return hit[1]
    return place(names[1:], leaf)

  return jax.tree_util.tree_map_with_path(place_state, abstract_state)


def config_state_shardings(abstract_state, mesh: Mesh, config):
  """:func:`state_shardings` with ``config.sharding_rules`` and ``config.fsdp_min_size``."""
  return state_shardings(abstract_state, mesh, config.sharding_rules,
                         fsdp_min_size=int(config.get("fsdp_min_size", DEFAULT_FSDP_MIN_SIZE)))


def placement_summary(abstract_state, shardings) -> str:
  """One line for the log: sharded leaves and the state's bytes per device."""
  leaves = jax.tree_util.tree_leaves(abstract_state)
  shards = jax.tree_util.tree_leaves(shardings)
  total = per_device = 0
  sharded = 0
  for leaf, sh in zip(leaves, shards):
    item = np.dtype(leaf.dtype).itemsize
    total += math.prod(leaf.shape) * item
    per_device += math.prod(sh.shard_shape(leaf.shape)) * item
    sharded += not sh.is_fully_replicated
  return (f"state {per_device / 2**20:.1f} MiB per device of {total / 2**20:.1f} MiB "
          f"({sharded} of {len(leaves)} leaves sharded)")
