"""The Colab notebooks run top to bottom (headless, nbclient) with smoke settings.

Each notebook is executed in a fresh kernel running this interpreter
(``sys.executable``: the activated venv), with ``CAFEQ_COLAB_SMOKE=1`` and the
repository root as working directory; an exception in any cell fails the test.
"""

from __future__ import annotations

import json
import os
import sys

import pytest

nbformat = pytest.importorskip('nbformat')
nbclient = pytest.importorskip('nbclient')
pytest.importorskip('ipykernel')

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NOTEBOOKS = ('quickstart.ipynb', 'method.ipynb', 'kernels.ipynb')
CELL_TIMEOUT_S = 600
_KERNEL = 'cafeq-test-python'


@pytest.fixture
def kernel_name(tmp_path, monkeypatch):
  """A kernelspec (in a temp Jupyter path) that runs this very interpreter."""
  spec_dir = tmp_path / 'jupyter' / 'kernels' / _KERNEL
  spec_dir.mkdir(parents=True)
  spec = {
      'argv': [sys.executable, '-m', 'ipykernel_launcher', '-f', '{connection_file}'],
      'display_name': 'cafeq test kernel', 'language': 'python',
      'env': {'CAFEQ_COLAB_SMOKE': '1', 'MPLBACKEND': 'module://matplotlib_inline.backend_inline'},
  }
  (spec_dir / 'kernel.json').write_text(json.dumps(spec))
  monkeypatch.setenv('JUPYTER_PATH', str(tmp_path / 'jupyter'))
  monkeypatch.setenv('CAFEQ_COLAB_SMOKE', '1')
  # Keep the kernel's JAX on the CPU and modest in threads (CI shares cores).
  monkeypatch.setenv('JAX_PLATFORMS', os.environ.get('JAX_PLATFORMS', 'cpu'))
  return _KERNEL


def _errors(nb) -> list[str]:
  out = []
  for i, cell in enumerate(nb.cells):
    for o in cell.get('outputs', []):
      if o.get('output_type') == 'error':
        out.append(f'cell {i}: {o.get("ename")}: {o.get("evalue")}')
  return out


def test_notebooks_are_valid_nbformat_v4_with_install_cell_first():
  for name in NOTEBOOKS:
    nb = nbformat.read(os.path.join(REPO, 'colabs', name), as_version=4)
    nbformat.validate(nb)
    assert nb.nbformat == 4
    code = [c for c in nb.cells if c.cell_type == 'code']
    assert 'pip' in code[0].source and "find_spec('cafeq_jax')" in code[0].source, name
    assert any('CAFEQ_COLAB_SMOKE' in c.source for c in code), name
    assert all(not c.get('outputs') for c in code), f'{name} is committed with outputs'
    # One idea per cell: prose between code cells.
    kinds = [c.cell_type for c in nb.cells]
    assert kinds.count('markdown') >= kinds.count('code') - 1, name


@pytest.mark.parametrize('name', NOTEBOOKS)
def test_notebook_runs_top_to_bottom_with_smoke_settings(name, kernel_name):
  nb = nbformat.read(os.path.join(REPO, 'colabs', name), as_version=4)
  client = nbclient.NotebookClient(
      nb, kernel_name=kernel_name, timeout=CELL_TIMEOUT_S, allow_errors=False,
      resources={'metadata': {'path': REPO}})
  try:
    client.execute()
  except nbclient.exceptions.CellExecutionError as e:
    pytest.fail(f'{name} failed:\n{str(e)[-4000:]}')
  assert not _errors(nb)
  # Every code cell ran (none was skipped by an earlier silent failure).
  counts = [c.execution_count for c in nb.cells if c.cell_type == 'code']
  assert all(isinstance(n, int) for n in counts), counts
