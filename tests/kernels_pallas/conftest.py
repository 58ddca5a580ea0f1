"""Makes the top-level ``kernels_pallas`` package importable from a source checkout.

``tests/kernels_pallas`` (no ``__init__.py``) would otherwise be picked up as a
namespace package of the same name when ``tests/`` is on ``sys.path`` and the
repository root is not (e.g. an editable install made before ``kernels_pallas``
existed). Putting the root first makes the real package win.
"""

import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)
