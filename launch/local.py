r"""Runs N cooperating processes of a command on this machine (multi-host rehearsal).

Each process gets ``--coordinator_address=127.0.0.1:PORT --num_processes=N
--process_id=i`` appended and, on CPU, ``--xla_force_host_platform_device_count=D``
fake devices, so a multi-host run (jax.distributed over gloo) can be exercised
on one machine before going to a pod::

  python -m launch.local --processes=2 --devices_per_process=2 -- \
      python -m offseg_jax.main --config=experiments/configs/default.py:tiny \
      --workdir=/tmp/mp --config.total_steps=50

Output of process 0 is shown; the others go to ``<log_dir>/process_<i>.log``
(``--log_dir``, default ``/tmp/offseg_launch_logs``).
The launcher exits with the first non-zero exit code. Everything after ``--``
is the command (absl flags: the launcher's own come before it).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from typing import Sequence

from absl import flags

from offseg_jax import cli

USAGE = "python -m launch.local [--processes=N] [--devices_per_process=D] -- COMMAND ..."
DEFAULT_LOG_DIR = "/tmp/offseg_launch_logs"


def free_port() -> int:
  """A TCP port of this machine that is free now (for the coordinator)."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def define_flags(values: flags.FlagValues = flags.FLAGS) -> None:
  """The launcher's flags, on ``values`` (defined only when it runs)."""
  on = {"flag_values": values}
  flags.DEFINE_integer("processes", 2, "Processes to start.", lower_bound=1, **on)
  flags.DEFINE_integer("devices_per_process", 1, "Fake CPU devices per process (ignored on "
                       "GPU/TPU).", lower_bound=1, **on)
  if "log_dir" in values:   # absl.logging's: the directory for log files, as it is here
    flags.declare_key_flag("log_dir", flag_values=values)
  else:
    flags.DEFINE_string("log_dir", "", "Directory for log files.", **on)


def command(argv: Sequence[str], values: flags.FlagValues = flags.FLAGS) -> int:
  """Runs the command after ``--`` (``argv[1:]``) in ``--processes`` processes;
  returns the first non-zero exit code, else 0."""
  command_line = cli.positional(argv, minimum=1, maximum=None, usage=USAGE)
  log_dir = values.log_dir or DEFAULT_LOG_DIR
  os.makedirs(log_dir, exist_ok=True)
  port = free_port()
  procs = []
  for i in range(values.processes):
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                        f" --xla_force_host_platform_device_count={values.devices_per_process}")
    cmd = command_line + [f"--coordinator_address=127.0.0.1:{port}",
                          f"--num_processes={values.processes}", f"--process_id={i}"]
    out = None if i == 0 else open(os.path.join(log_dir, f"process_{i}.log"), "w")
    procs.append(subprocess.Popen(cmd, env=env, stdout=out,
                                  stderr=subprocess.STDOUT if out else None))
  codes = [p.wait() for p in procs]
  bad = [c for c in codes if c != 0]
  if bad:
    print(f"launch.local: exit codes {codes}; logs of processes > 0 in {log_dir}",
          file=sys.stderr)
  return bad[0] if bad else 0


# main([...]): the launcher in this process, e.g. from tests and notebooks.
main = cli.in_process(define_flags, command)


if __name__ == "__main__":
  cli.run(command, define_flags)
