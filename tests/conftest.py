"""Fixtures shared by the runner's end-to-end tests (train_e2e_test.py,
checkpoint_e2e_test.py): one JAX compilation cache and one uninterrupted
run of the tiny config (tests/testing.py), the yardstick that interrupted
and resumed runs must reproduce. Tests only read the reference workdir (or
copy it)."""

import pytest

from tests import testing


@pytest.fixture(scope='session')
def cache_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('jax_cache'))


@pytest.fixture(scope='session')
def reference(tmp_path_factory, cache_dir):
  workdir = str(tmp_path_factory.mktemp('reference'))
  result = testing.run_train(workdir, cache_dir=cache_dir)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir
