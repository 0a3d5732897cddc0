r"""Runs N cooperating processes of a command on this machine (multi-host rehearsal).

Each process gets ``--coordinator_address=127.0.0.1:PORT --num_processes=N
--process_id=i`` appended and, on CPU, ``--xla_force_host_platform_device_count=D``
fake devices, so a multi-host run (jax.distributed over gloo) can be exercised
on one machine before going to a pod::

  python -m launch.local --processes=2 --devices_per_process=2 -- \
      python -m offseg_jax.main --config=experiments/configs/default.py:tiny \
      --workdir=/tmp/mp --config.total_steps=50

Output of process 0 is shown; the others go to ``<log_dir>/process_<i>.log``.
The launcher exits with the first non-zero exit code.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--processes", type=int, default=2)
  parser.add_argument("--devices_per_process", type=int, default=1,
                      help="fake CPU devices per process (ignored on GPU/TPU)")
  parser.add_argument("--log_dir", default="/tmp/offseg_launch_logs")
  parser.add_argument("command", nargs=argparse.REMAINDER)
  args = parser.parse_args(argv)
  command = args.command[1:] if args.command[:1] == ["--"] else args.command
  if not command:
    parser.error("give the command to run after --")
  os.makedirs(args.log_dir, exist_ok=True)
  port = free_port()
  procs = []
  for i in range(args.processes):
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                        f" --xla_force_host_platform_device_count={args.devices_per_process}")
    cmd = command + [f"--coordinator_address=127.0.0.1:{port}",
                     f"--num_processes={args.processes}", f"--process_id={i}"]
    out = None if i == 0 else open(os.path.join(args.log_dir, f"process_{i}.log"), "w")
    procs.append(subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT if out else None))
  codes = [p.wait() for p in procs]
  bad = [c for c in codes if c != 0]
  if bad:
    print(f"launch.local: exit codes {codes}; logs of processes > 0 in {args.log_dir}",
          file=sys.stderr)
  return bad[0] if bad else 0


if __name__ == "__main__":
  sys.exit(main())
