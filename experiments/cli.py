"""Parsing of comma-separated config fields shared by the launchers."""

from __future__ import annotations

from typing import Any


def split_names(s: Any) -> list[str]:
  """``'a, b,,c'`` (or a list / tuple) -> ``['a', 'b', 'c']``."""
  if isinstance(s, (list, tuple)):
    return [str(x).strip() for x in s if str(x).strip()]
  return [x.strip() for x in str(s).split(',') if x.strip()]


def split_ints(s: Any, field: str) -> list[int]:
  """``'4,3'`` -> ``[4, 3]``; a ValueError naming ``config.<field>`` otherwise."""
  try:
    return [int(x) for x in split_names(s)]
  except ValueError:
    raise ValueError(f'config.{field}={s!r} must be comma-separated integers.') from None
