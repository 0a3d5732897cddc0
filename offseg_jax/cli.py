"""Command-line parsing shared by every command: one-line errors for bad flags.

``ml_collections`` reports an unknown ``--config.a.b=v`` field, or a value of
the wrong type, with a traceback from inside flag parsing. :func:`run` parses
the flags first and turns such an error into one line that names the flag, the
offending key and, where one exists, the nearest valid key::

  error: --config.model.nme=3: unknown config key 'nme' (did you mean 'name'?)
"""

from __future__ import annotations

import re
import sys
from typing import Callable, Sequence

from absl import app, flags


def _one_line(argv: Sequence[str], error: BaseException) -> str:
  text = " ".join(str(error).replace("\\n", " ").replace("\\'", "'").split())
  hint = re.search(r'Did you mean "([^"]+)" instead of "([^"]+)"', text)
  key = hint.group(2) if hint else next(iter(re.findall(r"'(\w+)'", text)), None)
  # The override that named the key (flag parsing stops at the first bad one).
  flag = next((a for a in argv if key and a.startswith("--") and
               re.search(rf"\.{re.escape(key)}(\.|=|$)", a.split("=")[0] + "=")), None)
  if key and isinstance(error, (AttributeError, KeyError)):
    msg = f"unknown config key {key!r}" + (f" (did you mean {hint.group(1)!r}?)" if hint else "")
  else:
    msg = text
  return f"error: {flag + ': ' if flag else ''}{msg}"


def parse_flags(argv: Sequence[str]) -> Sequence[str]:
  """absl's parser, with config and flag errors as one line and exit status 2."""
  try:
    remaining = flags.FLAGS(list(argv))
    config = flags.FLAGS["config"].value if "config" in flags.FLAGS else None
    if config is not None and "data" in config:   # refuse a data.name the config misfits
      from input_pipeline import dataset_config  # pylint: disable=g-import-not-at-top
      dataset_config.check_choice(config.data)
    return remaining
  except flags.Error as e:
    print(f"error: {e}", file=sys.stderr)
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    print(_one_line(argv, e), file=sys.stderr)
  sys.exit(2)


def run(main: Callable[[Sequence[str]], None]) -> None:
  """``absl.app.run(main)`` with :func:`parse_flags` as the flag parser."""
  app.run(main, flags_parser=parse_flags)
