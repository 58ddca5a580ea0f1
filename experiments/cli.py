"""What the launchers share: parsing of comma-separated config fields, the absl main."""

from __future__ import annotations

from typing import Any
from typing import Callable

from absl import app
from ml_collections import config_flags

from cafeq_jax.distributed import log_processes


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


def launch(run: Callable[[Any], Any], default_config: str) -> None:
  """Runs a launcher as a program: ``--config`` (default ``default_config``, a
  config file; locked, so a typo in a field name fails), the JAX processes logged,
  then ``run(config)``. A stray positional argument is a usage error, not ignored.

  The flag is defined here, when the launcher runs, not at import: tests,
  notebooks and other launchers import launchers that each have a ``--config``.
  """
  flag = config_flags.DEFINE_config_file(
    'config', default_config, f'path to config file (default {default_config}).', lock_config=True
  )

  def main(argv: list[str]) -> None:
    if len(argv) > 1:
      raise app.UsageError(f'Too many command-line arguments: {argv[1:]}')
    log_processes()
    run(flag.value)

  app.run(main)
