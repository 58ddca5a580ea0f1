"""Atomic file writes: a reader sees the old file or the new one, never a torn one."""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any


def write_text(path: str | os.PathLike, text: str) -> None:
  """Writes ``text`` to ``path`` via a temp file in the same dir + ``os.replace``."""
  path = os.fspath(path)
  directory = os.path.dirname(path) or '.'
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix='.' + os.path.basename(path), suffix='.tmp')
  try:
    with os.fdopen(fd, 'w') as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def write_json(path: str | os.PathLike, obj: Any) -> None:
  """``write_text`` of ``obj`` as indented JSON."""
  write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str))
