"""The layering of docs/architecture.md: no module imports one above it.

Every import statement of the package, including those inside functions, is
read with ``ast``; a module may import from its own layer or the layers below.
"""

import ast
import pathlib

REPO = pathlib.Path(__file__).resolve().parents[1]

# Bottom (0) to top, as docs/architecture.md lists them.
LAYERS = [
    ("input_pipeline",),
    ("offseg_jax.registry", "offseg_jax.sharding", "offseg_jax.preemption",
     "offseg_jax.workdir_lock", "offseg_jax.metric_log", "offseg_jax.distributed"),
    ("offseg_jax.conversion",),
    ("offseg_jax.checkpointing",),
    ("offseg_jax.models",),
    ("offseg_jax.losses", "offseg_jax.optim"),
    ("offseg_jax.evaluation",),
    ("offseg_jax.train",),
    ("offseg_jax.main", "offseg_jax.evaluate", "offseg_jax.predict", "offseg_jax.convert",
     "offseg_jax.cli"),
    ("offseg_jax.tools",),
]


def _layer(module: str) -> int | None:
  for rank, prefixes in enumerate(LAYERS):
    if any(module == p or module.startswith(p + ".") for p in prefixes):
      return rank
  return None


def _modules():
  for package in ("input_pipeline", "offseg_jax"):
    for path in sorted((REPO / package).rglob("*.py")):
      parts = path.relative_to(REPO).with_suffix("").parts
      name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
      yield name, path


def _imports(path: pathlib.Path, package: str):
  """(line, imported module) of every import of ours in ``path``."""
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module:
      # `from offseg_jax import train` imports the module offseg_jax.train.
      names = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
    else:
      continue
    for name in names:
      if name.split(".")[0] in ("offseg_jax", "input_pipeline"):
        yield node.lineno, name


def test_every_module_has_a_layer():
  missing = [name for name, _ in _modules()
             if name not in ("offseg_jax", "input_pipeline") and _layer(name) is None]
  assert not missing, f"add these to LAYERS and docs/architecture.md: {missing}"


def test_no_module_imports_one_above_it():
  violations = []
  for name, path in _modules():
    own = _layer(name)
    if own is None:
      continue
    for line, imported in _imports(path, name):
      rank = _layer(imported)
      if rank is not None and rank > own:
        violations.append(f"{path.relative_to(REPO)}:{line} ({name}, layer {own}) imports "
                          f"{imported} (layer {rank})")
  assert not violations, "\n".join(violations)


def test_the_trainer_is_imported_only_by_commands_and_tools():
  importers = sorted({name for name, path in _modules()
                      for _, imported in _imports(path, name) if imported == "offseg_jax.train"})
  assert importers and all(_layer(n) > _layer("offseg_jax.train") for n in importers), importers
