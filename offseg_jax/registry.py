"""Name -> builder registries for every swappable component.

Models, backbones, heads, necks and classifiers are looked up by name from the
config, so components mix freely (e.g. any head with the Offset Learning
classifier, or an ECENet head on a MiT backbone) without touching the trainer.

A model builder is a callable ``builder(num_classes: int, **overrides) -> nn.Module``
returning a module whose ``__call__(images, train=False, **inputs)`` maps NHWC,
normalised float images to ``(logits, aux)``: logits are NHWC at the head's native
stride, ``aux`` is a dict of auxiliary outputs (backbone features, extra logits,
class embeddings...) that losses and evaluators may use.

Builders may also declare ``from_official``: a callable
``(official_config: dict, num_classes: int) -> nn.Module`` that maps the official
mmseg constructor config (as embedded in a checkpoint's ``meta`` or a parity
fixture header) onto our modules, and ``torch_ignore``: regexes of official
state-dict keys that carry no information for us (e.g. ``num_batches_tracked``).
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Callable


@dataclasses.dataclass(frozen=True)
class Entry:
  """One registered component."""
  name: str
  builder: Callable[..., Any]
  from_official: Callable[..., Any] | None = None
  torch_ignore: tuple[str, ...] = ()
  doc: str = ""


class Registry:
  """A named table of builders with helpful errors for unknown names."""

  def __init__(self, kind: str):
    self.kind = kind
    self._entries: dict[str, Entry] = {}

  def register(self, name: str, *, from_official=None, torch_ignore=()):
    """Decorator registering ``builder`` under ``name``."""

    def wrap(builder):
      if name in self._entries:
        raise ValueError(f"{self.kind} {name!r} is registered twice")
      self._entries[name] = Entry(
          name=name, builder=builder, from_official=from_official,
          torch_ignore=tuple(torch_ignore), doc=(builder.__doc__ or "").strip())
      return builder

    return wrap

  def get(self, name: str) -> Entry:
    if name not in self._entries:
      close = difflib.get_close_matches(name, list(self._entries), n=3)
      hint = f" Did you mean {close}?" if close else ""
      raise KeyError(
          f"Unknown {self.kind} {name!r}.{hint} Registered: {sorted(self._entries)}")
    return self._entries[name]

  def build(self, name: str, *args, **kwargs):
    return self.get(name).builder(*args, **kwargs)

  def __contains__(self, name: str) -> bool:
    return name in self._entries

  def names(self) -> list[str]:
    return sorted(self._entries)


MODELS = Registry("model")            # full segmentors (backbone + head)
BACKBONES = Registry("backbone")
NECKS = Registry("neck")
HEADS = Registry("head")
BLOCKS = Registry("block")            # stand-alone blocks with parity fixtures
METRICS = Registry("metric")          # evaluation metrics with parity fixtures
