"""Fixtures shared by the launcher tests."""

from __future__ import annotations

import pytest

from experiments import quantize_lib


@pytest.fixture
def no_model_load(monkeypatch):
  """Fails the test if a launcher loads its model: bad requests must be refused first."""

  def load_model(*a, **k):
    raise AssertionError('the model was loaded')

  monkeypatch.setattr(quantize_lib, 'load_model', load_model)
