"""Puts the repository root first on ``sys.path`` so ``kernels_pallas`` imports from a
source checkout even when the editable install predates that package."""

import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)
