"""benchmarks/gemm_share.py: `native.library.gemms_skipped` skips the
library's GEMMs and restores them, and the script splits a step (the main
job's small model; no timing claims)."""

import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from benchmarks import gemm_share
from perceiver import native
from perceiver.native import library
from tests import testing

pytestmark = pytest.mark.skipif(not native.available(),
                                reason='perceiver.native unavailable')


def test_products_are_skipped_inside_and_computed_after():
  rng = np.random.default_rng(7)
  a = rng.standard_normal((37, 29), dtype=np.float32)
  b = rng.standard_normal((29, 23), dtype=np.float32)
  expected = a.astype(np.float64) @ b
  product = jax.jit(lambda a, b: native.matmul(a, b))
  with library.gemms_skipped():
    skipped = np.asarray(product(a, b))
  assert not np.allclose(skipped, expected, atol=1e-3)
  np.testing.assert_allclose(product(a, b), expected, rtol=1e-5, atol=1e-4)


def test_the_gemms_come_back_after_an_error():
  a = np.eye(8, dtype=np.float32)
  with pytest.raises(KeyError):
    with library.gemms_skipped():
      raise KeyError('inside')
  np.testing.assert_array_equal(jax.jit(native.matmul)(a, 2 * a), 2 * a)


def test_split_of_medians():
  result = gemm_share.split([3.0, 1.0, 2.0], [0.5, 0.4, 0.6], 3e9)
  assert result['step_s'] == 2.0 and result['rest_s'] == 0.5
  assert result['gemm_s'] == 1.5 and result['gemm_share'] == 0.75
  assert result['gemm_gflops'] == pytest.approx(2.0)


def test_the_script_splits_a_step():
  result = subprocess.run(
      [sys.executable, 'benchmarks/gemm_share.py',
       '--config=configs/fashion_mnist.py', '--pairs=2', '--warmup=1'],
      cwd=testing.ROOT, env=testing.subprocess_env(1), capture_output=True,
      text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  row = result.stdout.strip().splitlines()[-1]
  step, rest, gemms, share, flops, rate = [
      cell.strip() for cell in row.strip('|').split('|')]
  assert float(step) > 0 and float(rest) > 0
  assert float(gemms) == pytest.approx(float(step) - float(rest), abs=2e-3)
  assert float(flops) > 1  # GFLOPs of the library's calls: it ran
  assert re.fullmatch(r'-?\d+%', share) and rate
