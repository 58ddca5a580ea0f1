"""Peak memory of this process: host RSS and accelerator memory.

Used by the launchers to report what a quantization run needed. On CPU there is
no device allocator statistic, so only the host figure is available.
"""

from __future__ import annotations

import resource
import sys

import jax


def peak_host_bytes() -> int:
  """Peak resident set size of this process so far, in bytes."""
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return int(rss if sys.platform == 'darwin' else rss * 1024)  # Linux reports KiB


def peak_device_bytes() -> int | None:
  """Largest ``peak_bytes_in_use`` over this process's devices; None on CPU."""
  peaks = []
  for device in jax.local_devices():
    try:
      stats = device.memory_stats()
    except Exception:  # pylint: disable=broad-except  (backends without stats)
      stats = None
    if stats and 'peak_bytes_in_use' in stats:
      peaks.append(int(stats['peak_bytes_in_use']))
  return max(peaks) if peaks else None


def peak_memory() -> dict[str, float | None]:
  """``{'peak_host_mib', 'peak_device_mib'}`` (device None without statistics)."""
  device = peak_device_bytes()
  return {
    'peak_host_mib': peak_host_bytes() / 2**20,
    'peak_device_mib': None if device is None else device / 2**20,
  }
