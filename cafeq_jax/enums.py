"""String enums for options that take one of a few values, and their coercion."""

from __future__ import annotations

import enum
from typing import TypeVar

E = TypeVar('E', bound=enum.StrEnum)


def coerce(cls: type[E], value, field: str) -> E:
  """``cls(value)`` or a ValueError naming ``field``, the value and the choices.

  A ``StrEnum`` member equals its string, so configs built from plain strings
  ('cosine') and from members (``Schedule.COSINE``) compare and hash alike.
  """
  try:
    return cls(value)
  except ValueError:
    raise ValueError(
      f'{field}={value!r} is not supported; expected one of {[m.value for m in cls]}.'
    ) from None
