r"""Command-line parsing shared by the commands: absl flags, one-line errors.

The commands that run through :func:`run` (``python -m offseg_jax.main``,
``offseg_jax.evaluate``, ``offseg_jax.predict``, ``offseg_jax.convert``,
``offseg_jax.tools.complexity``, ``.complexity_table``, ``.parity``,
``.benchmark_evaluation``, ``.benchmark_input``, ``launch.local``) parse their
command line with absl flags and share these rules:

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

A command that is also called from Python (``convert.main([...])``) runs
through :func:`call`: the same parsing on flags of its own, returning the exit
status.
"""

from __future__ import annotations

import re
import sys
from typing import Callable, Sequence

from absl import app, flags
from ml_collections import config_flags

from offseg_jax import distributed

# Flags defined here (define_checkpoint_flags) belong to the command that asks
# for them, so its --help lists them with its own.
flags.disclaim_key_flags()

# Defines a command's flags on the given FlagValues (absl's global FLAGS by default).
DefineFlags = Callable[[flags.FlagValues], None]
# A command: the positional arguments (after the program name) and its flag values
# -> the exit status (None: 0).
Command = Callable[[Sequence[str], flags.FlagValues], "int | None"]


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


def _usage_error(error: app.UsageError) -> int:
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
      sys.exit(_usage_error(e))

  app.run(main_with_one_line_usage, flags_parser=parse_flags)


def call(define_flags: DefineFlags, command: Command, argv: Sequence[str] = ()) -> int:
  """Runs a command in this process as its command line would, on ``argv``.

  ``argv`` holds the arguments after the program name. The command's flags
  are defined afresh on a ``FlagValues`` of their own (so it runs any number
  of times, beside other commands' flags), parsed as by :func:`run`, and
  ``command(positional_argv, flag_values)`` runs; errors print the same one
  line. Returns the exit status.
  """
  values = flags.FlagValues()
  define_flags(values)
  full_argv = [command.__module__, *argv]
  saved_argv, sys.argv = sys.argv, full_argv   # ml_collections reads --config.* there
  try:
    try:
      remaining = parse_flags(full_argv, values)
    finally:
      sys.argv = saved_argv
    return command(remaining, values) or 0
  except app.UsageError as e:
    return _usage_error(e)
  except SystemExit as e:     # a flag error, or sys.exit(...) in the command
    if isinstance(e.code, str):
      print(e.code, file=sys.stderr)
      return 1
    return e.code or 0


def in_process(define_flags: DefineFlags, command: Command) -> Callable[[Sequence[str]], int]:
  """The command as a function of its command line, run in this process by :func:`call`.

  ``main = cli.in_process(define_flags, command)`` in a command's module makes
  ``main(["--model", "offseg_t", "SRC", "DST"])`` do what the same arguments
  do after ``python -m <module>``, and return the exit status.
  """
  def main(argv: Sequence[str] = ()) -> int:
    return call(define_flags, command, argv)

  main.__doc__ = (f"Runs ``python -m {command.__module__}`` in this process on ``argv`` (the "
                  "arguments after the program name); returns the exit status.")
  return main


def in_registry(registry) -> Callable[[str | None], bool]:
  """A flag validator: the value names an entry of ``registry`` (e.g.
  ``registry.MODELS``); else the registry's message, which names the choices."""
  def check(name: str | None) -> bool:
    if name is not None:
      try:
        registry.get(name)
      except KeyError as e:
        raise flags.ValidationError(e.args[0]) from None
    return True

  return check


def define_checkpoint_flags() -> None:
  """The flags of the commands that run a checkpoint (evaluate, predict).

  ``--config``, ``--checkpoint``, ``--mode``, ``--tta``, ``--which`` (the
  caller's ``--help`` lists them with its own) and the multi-process flags.
  """
  config_flags.DEFINE_config_file("config", None, "Experiment config file[:arg] (default: "
                                  "the training checkpoint's own).", lock_config=True)
  flags.DEFINE_string("checkpoint", None, "Workdir, step directory or converted checkpoint.")
  flags.DEFINE_enum("mode", None, ["whole", "slide"], "Override config.eval.mode.")
  flags.DEFINE_bool("tta", None, "Multi-scale + flip test-time augmentation "
                    "(default: config.eval.tta).")
  flags.DEFINE_enum("which", "latest", ["latest", "best"], "Step of a training workdir.")
  distributed.define_flags()
