"""Atomic writes: a reader sees the old version or the new one, never a torn one.

Files (``write_bytes`` / ``write_text`` / ``write_json``) are written to a hidden
sibling temporary ``.<name>.tmp.<pid>.<hex>``, flushed to disk and renamed over
the target (``os.replace``, atomic on POSIX).

Directories (a saved model, an HF export) are built in a hidden sibling
temporary (``make_temp_dir``) and swapped in by ``replace_dir`` only once
complete: with Linux's ``renameat2(RENAME_EXCHANGE)`` the old and the new
directory trade places in one atomic step, then the old one is deleted. Where
the file system lacks it, the old directory is first renamed to a hidden
``.<name>.old.<pid>.<hex>`` sibling; a crash between the two renames leaves the
target missing, and ``recover`` (called by every reader and writer here) renames
that old version back. Either way the previous version stays readable until the
new one is complete, also through Ctrl-C (``KeyboardInterrupt``) and SIGKILL.

Temporaries left by a killed process (its pid no longer alive) are removed by
``clean_stale`` on the next write of the same target.

Modes follow the user's umask: files are created ``0o666 & ~umask``,
directories ``0o777 & ~umask`` (not ``mkstemp``'s 0600 / ``mkdtemp``'s 0700).

``locked(path)`` is an exclusive ``fcntl.flock`` on a lock file, for read-merge-
write cycles of files that several processes update (``results.json``).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import os
import re
import secrets
import shutil
import threading
import time
from typing import Any
from typing import Callable
from typing import Iterator

from absl import logging

_TMP, _OLD = 'tmp', 'old'
# Orbax writes a save into ``<dest>.orbax-checkpoint-tmp`` first: that of a temporary
# counts as the temporary's.
_TEMP_NAME = re.compile(
  r'^\.(?P<base>.+)\.(?P<kind>tmp|old)\.(?P<pid>\d+)\.[0-9a-f]+'
  r'(\.orbax-checkpoint-tmp.*)?$'
)
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_exchange_ok = True  # cleared after the first EINVAL / ENOSYS from renameat2


def _sibling(path: str, kind: str) -> str:
  directory, base = os.path.split(os.path.abspath(path))
  return os.path.join(directory, f'.{base}.{kind}.{os.getpid()}.{secrets.token_hex(4)}')


def is_temporary(name: str) -> bool:
  """Whether the file name ``name`` is one of this module's temporaries."""
  return _TEMP_NAME.match(os.path.basename(name)) is not None


def _fsync_dir(directory: str) -> None:
  try:
    fd = os.open(directory, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


def write_with(path: str | os.PathLike, write: Callable[[str], None]) -> None:
  """Like ``write_bytes`` for a writer that needs a path: ``write(tmp)`` creates the
  sibling temporary ``tmp`` (e.g. a library's file writer), which then replaces
  ``path``. On any exception the temporary is removed and ``path`` is unchanged."""
  path = os.path.abspath(os.fspath(path))
  directory = os.path.dirname(path)
  os.makedirs(directory, exist_ok=True)
  if os.path.isdir(path):
    raise IsADirectoryError(f'{path!r} is a directory; refusing to replace it with a file.')
  tmp = _sibling(path, _TMP)
  try:
    write(tmp)
    apply_umask(tmp)
    with open(tmp, 'rb') as f:
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.unlink(tmp)
    raise
  _fsync_dir(directory)
  clean_stale(path)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
  """Writes ``data`` to ``path`` via a sibling temporary + ``os.replace``.

  The file gets mode ``0o666 & ~umask``. On any exception (Ctrl-C included)
  the temporary is removed and ``path`` is unchanged.
  """

  def write(tmp: str) -> None:
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    with os.fdopen(fd, 'wb') as f:
      f.write(data)

  write_with(path, write)


def write_text(path: str | os.PathLike, text: str) -> None:
  """``write_bytes`` of ``text`` as UTF-8."""
  write_bytes(path, text.encode('utf-8'))


def write_json(path: str | os.PathLike, obj: Any) -> None:
  """``write_text`` of ``obj`` as indented JSON."""
  write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str))


def make_temp_dir(path: str | os.PathLike) -> str:
  """A new empty hidden sibling directory of ``path`` (mode ``0o777 & ~umask``)."""
  path = os.path.abspath(os.fspath(path))
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = _sibling(path, _TMP)
  os.mkdir(tmp, 0o777)
  return tmp


def fsync_tree(path: str | os.PathLike) -> None:
  """fsyncs every file and directory under ``path`` (before it is swapped in)."""
  for root, _, files in os.walk(os.fspath(path)):
    for name in files:
      try:
        fd = os.open(os.path.join(root, name), os.O_RDONLY)
      except OSError:
        continue
      try:
        os.fsync(fd)
      finally:
        os.close(fd)
    _fsync_dir(root)


def current_umask() -> int:
  """The process umask (read from /proc where possible: no set-and-restore race)."""
  try:
    with open('/proc/self/status') as f:
      for line in f:
        if line.startswith('Umask:'):
          return int(line.split()[1], 8)
  except (OSError, ValueError, IndexError):
    pass
  mask = os.umask(0o022)
  os.umask(mask)
  return mask


def apply_umask(path: str | os.PathLike, *, tree: bool = False) -> None:
  """Gives ``path`` (every entry below it with ``tree``) the modes a plain ``open`` /
  ``mkdir`` would: ``0o666 & ~umask`` for files, ``0o777 & ~umask`` for directories.

  For files written by libraries that create them private (``mkstemp``-style 0600).
  """
  mask = current_umask()
  paths = [os.fspath(path)]
  if tree:
    for root, dirs, files in os.walk(os.fspath(path)):
      paths += [os.path.join(root, n) for n in dirs + files]
  for p in paths:
    if os.path.islink(p):
      continue
    os.chmod(p, (0o777 if os.path.isdir(p) else 0o666) & ~mask)


def _exchange(a: str, b: str) -> bool:
  """Atomically swaps the paths ``a`` and ``b``; False where unsupported."""
  global _exchange_ok
  if not _exchange_ok:
    return False
  try:
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = libc.renameat2
  except (OSError, AttributeError):
    _exchange_ok = False
    return False
  if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
    return True
  err = ctypes.get_errno()
  if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
    _exchange_ok = False
    return False
  raise OSError(err, f'renameat2(RENAME_EXCHANGE) of {a!r} and {b!r}: {os.strerror(err)}')


def replace_dir(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
  """Swaps the complete directory ``tmp`` in as ``path``; the old one is deleted.

  At every instant ``path`` is the old complete directory or the new one (with
  the two-rename fallback, ``recover`` restores the old one after a crash
  between the renames).
  """
  tmp, path = os.path.abspath(os.fspath(tmp)), os.path.abspath(os.fspath(path))
  if not os.path.lexists(path):
    try:
      os.rename(tmp, path)
      _fsync_dir(os.path.dirname(path))
      return
    except OSError as e:
      if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
        raise
  if os.path.islink(path) or not os.path.isdir(path):
    raise FileExistsError(f'{path!r} exists and is not a directory; refusing to replace it.')
  if _exchange(tmp, path):
    # tmp now holds the old version.
    _fsync_dir(os.path.dirname(path))
    shutil.rmtree(tmp, ignore_errors=True)
    return
  old = _sibling(path, _OLD)
  os.rename(path, old)
  os.rename(tmp, path)
  _fsync_dir(os.path.dirname(path))
  shutil.rmtree(old, ignore_errors=True)


def _temporaries(path: str) -> list[tuple[str, str, int]]:
  """``(full path, kind, pid)`` of this module's temporaries of ``path``."""
  directory, base = os.path.split(os.path.abspath(path))
  try:
    names = os.listdir(directory)
  except OSError:
    return []
  out = []
  for name in names:
    m = _TEMP_NAME.match(name)
    if m and m.group('base') == base:
      out.append((os.path.join(directory, name), m.group('kind'), int(m.group('pid'))))
  return out


def _alive(pid: int) -> bool:
  if pid == os.getpid():
    return True
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def recover(path: str | os.PathLike) -> bool:
  """Restores ``path`` from its old version if a swap was cut between its renames.

  Returns:
    True when ``path`` was missing and an old version was renamed back.
  """
  path = os.path.abspath(os.fspath(path))
  if os.path.lexists(path):
    return False
  olds = [
    (os.path.getmtime(p), p)
    for p, kind, _ in _temporaries(path)
    if kind == _OLD and os.path.isdir(p)
  ]
  if not olds:
    return False
  _, newest = max(olds)
  try:
    os.rename(newest, path)
  except OSError:
    return False
  logging.warning(
    '%s was missing after an interrupted replace; restored its previous version from %s',
    path,
    newest,
  )
  return True


def clean_stale(path: str | os.PathLike) -> None:
  """Removes temporaries of ``path`` left by processes that are no longer alive."""
  path = os.path.abspath(os.fspath(path))
  recover(path)
  for p, _, pid in _temporaries(path):
    if _alive(pid):
      continue
    if os.path.isdir(p) and not os.path.islink(p):
      shutil.rmtree(p, ignore_errors=True)
    else:
      with contextlib.suppress(OSError):
        os.unlink(p)


def move_aside(path: str | os.PathLike, why: str) -> str:
  """Renames ``path`` to ``<path>.corrupt-<time>`` (kept for inspection); returns it."""
  path = os.fspath(path)
  dest = f'{path}.corrupt-{time.strftime("%Y%m%d-%H%M%S")}-{secrets.token_hex(2)}'
  os.rename(path, dest)
  logging.warning('%s %s; moved it aside to %s and starting afresh.', path, why, dest)
  return dest


class Lock:
  """An exclusive ``fcntl.flock`` on ``path`` (created ``0o666 & ~umask``).

  Re-entrant within one ``Lock`` object (nested ``with`` blocks take it once);
  two ``Lock`` objects exclude each other even in one process (each opens its
  own file description), so threads and processes are both serialised.
  """

  def __init__(self, path: str | os.PathLike):
    self.path = os.path.abspath(os.fspath(path))
    self._depth = 0
    self._fd: int | None = None
    self._mutex = threading.RLock()

  def __enter__(self) -> Lock:
    self._mutex.acquire()
    if self._depth == 0:
      os.makedirs(os.path.dirname(self.path), exist_ok=True)
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX)
      except BaseException:
        os.close(fd)
        self._mutex.release()
        raise
      self._fd = fd
    self._depth += 1
    return self

  def __exit__(self, *exc) -> None:
    self._depth -= 1
    if self._depth == 0 and self._fd is not None:
      try:
        fcntl.flock(self._fd, fcntl.LOCK_UN)
      finally:
        os.close(self._fd)
        self._fd = None
    self._mutex.release()


@contextlib.contextmanager
def locked(path: str | os.PathLike) -> Iterator[None]:
  """``with locked(lock_file):`` holds an exclusive flock on ``lock_file``."""
  with Lock(path):
    yield
