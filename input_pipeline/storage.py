"""Path helpers over ``etils.epath`` for the data and evaluation tools.

Every file the toolkit reads or writes goes through ``epath.Path``, so a path
may be local (relative or absolute) or a ``gs://`` (or other epath-supported)
URL. These helpers cover what ``os.path`` / ``os.walk`` did on strings:

* :func:`join` and :func:`absolute`: ``os.path.join`` / ``abspath`` that keep
  URLs intact (``os.path.abspath('gs://b/x')`` would make it a local path);
* :func:`walk`: ``os.walk`` giving each directory's path relative to the top,
  whichever epath backend serves it (fsspec's ``gcsfs`` returns directories
  without their ``gs://``), optionally following links to directories.
"""

from __future__ import annotations

import os
import sys
from typing import Iterator

from etils import epath


def join(*parts: str | os.PathLike) -> str:
  """``os.path.join`` for local paths and URLs alike (normalised by epath)."""
  return os.fspath(epath.Path(*parts))


def absolute(path: str | os.PathLike) -> epath.Path:
  """``path`` made absolute against the current directory; URLs as they are."""
  path = epath.Path(path)
  return path if path.is_absolute() else path.resolve()


def is_local(path: str | os.PathLike) -> bool:
  """True for a path on the local file system (no ``scheme://``)."""
  return "://" not in os.fspath(path)


def _without_scheme(path: str) -> str:
  return path.split("://", 1)[1] if "://" in path else path


def _relative(directory, top: str) -> str:
  """``directory`` relative to ``top``: ``''`` for top itself, else ``'a/b/'``."""
  d = _without_scheme(os.fspath(directory)).rstrip("/")
  if d == top:
    return ""
  if top == "" and not d.startswith("/"):
    return d + "/"
  if d.startswith(top + "/"):
    return d[len(top) + 1:] + "/"
  raise ValueError(f"walk of {top!r} returned {os.fspath(directory)!r}, not below it")


def walk(folder: str | os.PathLike, follow_links: bool = False
         ) -> Iterator[tuple[epath.Path, str, list[str]]]:
  """``(directory, relative, file names)`` of every directory under ``folder``.

  ``directory`` is ``folder / relative`` (same form as ``folder``: relative,
  absolute or URL); ``relative`` is ``''`` for ``folder`` itself, else ends in
  ``'/'``. Sub-directories are visited in sorted order; a missing ``folder``
  yields nothing (as ``os.walk``).

  With ``follow_links`` symbolic links to directories are descended into, as
  ``os.walk(folder, followlinks=True)`` does. epath's walk does not follow them:
  a linked directory is listed but not visited (Python 3.11), or listed as a
  file (3.12+); both are walked separately here (remote stores have no links).
  """
  folder = epath.Path(folder)
  check_files = follow_links and is_local(folder) and sys.version_info >= (3, 12)
  pending = [""]
  while pending:
    start = pending.pop()
    top = absolute(folder / start) if start else absolute(folder)
    top_str = _without_scheme(os.fspath(top)).rstrip("/")
    visited, listed = set(), []
    for dirpath, dirnames, filenames in top.walk():
      dirnames.sort()
      rel = start + _relative(dirpath, top_str)
      visited.add(rel)
      listed += [rel + d + "/" for d in dirnames]
      directory = folder / rel if rel else folder
      files = []
      for f in filenames:
        if check_files and (directory / f).is_dir():   # a link to a directory
          listed.append(rel + f + "/")
        else:
          files.append(f)
      yield directory, rel, files
    if follow_links:
      pending += sorted((rel for rel in listed if rel not in visited), reverse=True)
