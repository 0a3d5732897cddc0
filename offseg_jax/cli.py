r"""Command-line helpers of the ``offseg_jax`` commands.

Parsing follows the toolkit's one convention (absl flags, dashes or
underscores, one-line errors), :mod:`input_pipeline.command_line`, re-exported
here (:func:`run`, :func:`parse_flags`, :func:`positional`). This module adds
what only ``offseg_jax`` commands need:

* :func:`call` / :func:`in_process`: a command that is also called from Python
  (``convert.main([...])``) runs the same parsing on flags of its own and
  returns the exit status;
* :func:`in_registry`: a flag validator naming a registry's choices;
* :func:`define_checkpoint_flags`: the flags of the commands that run a
  checkpoint (evaluate, predict).
"""

from __future__ import annotations

import sys
from typing import Callable, Sequence

from absl import app, flags
from ml_collections import config_flags

from input_pipeline import command_line
from input_pipeline.command_line import parse_flags, positional, run  # the shared convention
from offseg_jax import distributed

# Flags defined here (define_checkpoint_flags) belong to the command that asks
# for them, so its --help lists them with its own.
flags.disclaim_key_flags()

# Defines a command's flags on the given FlagValues (absl's global FLAGS by default).
DefineFlags = Callable[[flags.FlagValues], None]
# A command: the positional arguments (after the program name) and its flag values
# -> the exit status (None: 0).
Command = Callable[[Sequence[str], flags.FlagValues], "int | None"]


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
    return command_line.usage_error(e)
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
