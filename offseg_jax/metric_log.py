"""A training run's scalars, written once for TensorBoard and once as JSON lines.

``MetricLog(workdir, start_step)`` (process 0 writes, the others do nothing):

* ``WORKDIR/tensorboard/events.out.tfevents.*`` through tensorboardX, for
  TensorBoard (no TensorFlow);
* ``WORKDIR/scalars.jsonl``: one JSON object per line, ``{"step": 100,
  "train/loss": 0.52, ...}``, as big_vision writes its metrics file. It is what
  the evaluation report (``offseg_jax.evaluate --report``) and the tests read
  back (:func:`read_scalars`): plain JSON, no event-file parser.

A resumed run keeps the lines up to the restored step and drops the later ones
the interrupted run had written, so the file holds one curve, as if the run had
never stopped. The file is rewritten whole on :meth:`MetricLog.flush` (the
trainer flushes at each checkpoint and evaluation, not at every logged step),
which also works on object stores without append (``gs://``).
"""

from __future__ import annotations

import json
import math
from typing import Mapping

from etils import epath
import jax

SCALARS_FILE = "scalars.jsonl"


def _number(value) -> float | None:
  value = float(value)
  return None if math.isnan(value) or math.isinf(value) else value   # strict JSON


def _read_lines(path: epath.Path) -> list[dict]:
  """The records of a scalars file; a torn last line (a killed writer) is dropped."""
  records = []
  for line in path.read_text().splitlines():
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      continue
    if isinstance(record, dict) and "step" in record:
      records.append(record)
  return records


class MetricLog:
  """Scalars of a run to TensorBoard event files and ``WORKDIR/scalars.jsonl``."""

  def __init__(self, workdir, start_step: int = 0, tensorboard: bool = True):
    """Args:
      workdir: the run's folder (local or ``gs://``).
      start_step: the step the run starts from; later lines of a previous run
        are dropped.
      tensorboard: also write TensorBoard event files (tensorboardX; ``gs://``
        needs google-cloud-storage).
    """
    self.enabled = jax.process_index() == 0
    self._path = epath.Path(workdir) / SCALARS_FILE
    self._records: list[dict] = []
    self._tb = None
    if not self.enabled:
      return
    self._path.parent.mkdir(parents=True, exist_ok=True)
    if self._path.exists():           # a resumed run: keep the curve up to its step
      self._records = [r for r in _read_lines(self._path) if r["step"] <= start_step]
    if tensorboard:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(str(epath.Path(workdir) / "tensorboard"))

  def scalars(self, step: int, values: Mapping[str, float], prefix: str = "") -> None:
    """Records ``values`` at ``step`` under ``prefix + name``."""
    if not self.enabled:
      return
    record = {"step": int(step)}
    for name, value in values.items():
      record[prefix + name] = _number(value)
      if self._tb is not None:
        self._tb.add_scalar(prefix + name, float(value), step)
    if self._records and self._records[-1]["step"] == record["step"]:
      self._records[-1].update(record)    # one line per step
    else:
      self._records.append(record)

  def flush(self) -> None:
    """Writes what was recorded so far (both files)."""
    if not self.enabled:
      return
    self._path.write_text("".join(json.dumps(r) + "\n" for r in self._records))
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if self.enabled:
      self.flush()
      if self._tb is not None:
        self._tb.close()


def read_scalars(workdir) -> dict[str, list[tuple[int, float]]]:
  """``{name: [(step, value), ...]}`` from ``WORKDIR/scalars.jsonl``; {} if absent.

  Values written as null (a non-finite loss) are left out of the curves.
  """
  path = epath.Path(workdir) / SCALARS_FILE
  if not path.exists():
    return {}
  curves: dict[str, list[tuple[int, float]]] = {}
  for record in _read_lines(path):
    for name, value in record.items():
      if name != "step" and value is not None:
        curves.setdefault(name, []).append((int(record["step"]), float(value)))
  return {name: sorted(points) for name, points in sorted(curves.items())}
