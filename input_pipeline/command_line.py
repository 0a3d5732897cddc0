r"""The toolkit's command-line convention: absl flags, one-line errors.

Every command, those of ``input_pipeline`` (``pack``, ``check``,
``cityscapes_convert``, ``bad_files``) and those of ``offseg_jax`` (through
:mod:`offseg_jax.cli`), parses its command line here, so they share these rules:

* A flag name may be spelled with dashes or underscores: ``--num-classes=150``
  is ``--num_classes=150`` and a boolean's ``--no-xla`` is ``--noxla``.
* A list flag takes comma-separated values: ``--size=512,1024``.
* Positional arguments (convert's ``SRC DST``) come back in ``argv``; after
  ``--`` everything is positional (launch.local's command).
  :func:`positional` checks how many there are.
* Bad input ends the command with one line on stderr and exit status 2, e.g. a
  config field that does not exist, with the nearest valid key::

    error: --config.model.nme=3: unknown config key 'nme' (did you mean 'name'?)

  and a command's own failures (a checkpoint that does not fit) with one
  ``error: ...`` line and status 1.

It lives in ``input_pipeline`` because that package sits at the bottom of the
layering (docs/architecture.md) and has commands of its own.
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


def _absl_spelling(argv: Sequence[str], flag_values: flags.FlagValues) -> list[str]:
  """``argv`` with dashed flag names as absl spells them.

  ``--num-classes=5`` -> ``--num_classes=5``; for a boolean ``xla``,
  ``--no-xla`` and ``--no_xla`` -> ``--noxla``. Only names that then denote a
  defined flag change (never a ``--config.a.b`` override), and nothing after
  ``--``.
  """
  out = list(argv[:1])
  for i, arg in enumerate(argv[1:], 1):
    if arg == "--":
      return out + list(argv[i:])
    name, eq, value = arg[2:].partition("=")
    if arg.startswith("--") and name and name not in flag_values:
      underscored = name.replace("-", "_")
      negated = re.sub(r"^no_?", "", underscored) if underscored.startswith("no") else None
      if underscored in flag_values:
        arg = f"--{underscored}{eq}{value}"
      elif negated and negated in flag_values and isinstance(flag_values[negated],
                                                              flags.BooleanFlag):
        arg = f"--no{negated}{eq}{value}"
    out.append(arg)
  return out


def parse_flags(argv: Sequence[str],
                flag_values: flags.FlagValues = flags.FLAGS) -> Sequence[str]:
  """absl's parser, with config and flag errors as one line and exit status 2.

  Returns the positional arguments, after the program name ``argv[0]``.
  """
  try:
    remaining = flag_values(_absl_spelling(argv, flag_values))
    config = flag_values["config"].value if "config" in flag_values else None
    if config is not None and "data" in config:   # refuse a data.name the config misfits
      from input_pipeline import dataset_config  # pylint: disable=g-import-not-at-top
      dataset_config.check_choice(config.data)
    return remaining
  except flags.Error as e:
    print(f"error: {e}", file=sys.stderr)
  except (AttributeError, KeyError, TypeError, ValueError, OSError) as e:  # OSError: config file
    print(_one_line(argv, e), file=sys.stderr)
  sys.exit(2)


def positional(argv: Sequence[str], minimum: int = 0, maximum: int | None = 0,
               usage: str | None = None) -> list[str]:
  """The positional arguments of ``argv`` (after the program name).

  Raises:
    absl.app.UsageError: fewer than ``minimum`` or more than ``maximum`` (None:
      no limit) of them; the message names the extra ones and ``usage`` (the
      command's synopsis). :func:`run` and :func:`call` print it as one line.
  """
  args = list(argv[1:])
  if maximum is not None and len(args) > maximum:
    extra = args[maximum:]
    problem = f"unexpected argument{'s' if len(extra) > 1 else ''}: {' '.join(extra)}"
  elif len(args) < minimum:
    wanted = f"{minimum}" if minimum == maximum else f"at least {minimum}"
    problem = f"expected {wanted} argument{'s' if minimum > 1 else ''}, got {len(args)}"
  else:
    return args
  raise app.UsageError(problem + (f" (usage: {usage})" if usage else " (see --help)"))


def usage_error(error: app.UsageError) -> int:
  """Prints ``error`` as one line; returns exit status 2."""
  # absl would print the whole module docstring before the message.
  print(f"error: {error}", file=sys.stderr)
  return 2


def run(main: Callable[[Sequence[str]], "int | None"],
        define_flags: Callable[[], None] | None = None) -> None:
  """``absl.app.run(main)`` with :func:`parse_flags` as the flag parser.

  ``define_flags()`` (when given) first defines the command's flags. A usage
  error of ``main`` (:func:`positional`) ends it with one line and exit
  status 2.
  """
  if define_flags is not None:
    define_flags()

  def main_with_one_line_usage(argv):
    try:
      return main(argv)
    except app.UsageError as e:
      sys.exit(usage_error(e))

  app.run(main_with_one_line_usage, flags_parser=parse_flags)
