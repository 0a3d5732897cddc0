"""Test setup shared by every test module.

* Two fake CPU devices, so the sharded (mesh) code paths run in every test
  (must be set before JAX initialises its backend).
* absl flags marked parsed: grain worker code reads absl flags, which pytest
  never parses (see shared/reference/jax_stack.md, grain pitfalls).
"""

import os
import sys
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import flags  # noqa: E402
import pytest  # noqa: E402

flags.FLAGS.mark_as_parsed()

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("OFFSEG_SHARED", REPO.parent / "shared"))
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))


@pytest.fixture(scope="session")
def repo_root() -> Path:
  return REPO


@pytest.fixture(scope="session")
def shared_dir() -> Path:
  if not SHARED.is_dir():
    pytest.skip(f"shared/ not found at {SHARED} (set OFFSEG_SHARED)")
  return SHARED
