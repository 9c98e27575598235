r"""Single-threaded GEMM rates of the BLAS libraries perceiver/native can call,
alone and with every CPU calling at once.

  python benchmarks/gemm_rates.py                 # W1's shapes, both libraries
  python benchmarks/gemm_rates.py --shapes=1024x512x512:NT --rounds=9

perceiver/native calls one single-threaded GEMM per chunk of work on XLA's
thread pool (common.h), from OpenBLAS (the scipy-openblas32 wheel) or MKL
(the mkl wheel; library.blas_choice). This times that call alone, in float32,
through the same C entry points (`scipy_cblas_sgemm`, MKL's `cblas_sgemm`
in its sequential layer), on the shapes of a W1 step (configs/w1.py: 4,096
latent rows of width 512, 8 heads of width 64 over 256 latents):

  [m, n, k] and which operand is read transposed (row-major, C = op(A) op(B)):
  the linear layers' x w (NN), dx = g w^T (NT) and dw = x^T g (TN), the fused
  Q/K/V projection, and one head's Q K^T, P V and P^T dO.

Each library is timed with one thread calling, and with --threads threads
(default: the CPUs this process may use) each calling its own product at
once, as the library's chunks run on XLA's pool (x N: the N threads' rates
summed). The libraries and thread counts are timed alternately, one round
each in turn, so that the machine's drift hits all; each figure is the
median over --rounds of a round's rate (GFLOP/s, 2 m n k per product).
Measured tables belong in benchmarks/RESULTS.md with the date and processor.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import sys
import threading
import time
from typing import Callable, Sequence

import numpy as np

# (m, n, k, form): form = which of op(A), op(B) is a transpose.
SHAPES = ((4096, 512, 512, 'NN'), (4096, 512, 512, 'NT'),
          (512, 512, 4096, 'TN'), (4096, 1536, 512, 'NN'),
          (256, 256, 64, 'NT'), (256, 64, 256, 'NN'), (256, 64, 256, 'TN'))
_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112


def _libraries() -> dict[str, Callable]:
  """{name: sgemm(ta, tb, m, n, k, a, lda, b, ldb, c, ldc)} of the BLAS
  libraries installed here, each set to one thread."""
  # pylint: disable=g-import-not-at-top
  import glob
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
      __file__))))
  from perceiver.native import library
  import scipy_openblas32
  # pylint: enable=g-import-not-at-top
  found = {}
  openblas = ctypes.CDLL(glob.glob(os.path.join(
      scipy_openblas32.get_lib_dir(), 'libscipy_openblas*.so'))[0])
  openblas.scipy_openblas_set_num_threads(1)
  found['openblas'] = openblas.scipy_cblas_sgemm
  path = library.mkl_path()
  if path is not None:
    mkl = ctypes.CDLL(str(path))
    # MKL_INTERFACE_LP64 and MKL_THREADING_SEQUENTIAL, as the library sets.
    if (mkl.MKL_Set_Interface_Layer(0) == 0 and
        mkl.MKL_Set_Threading_Layer(1) == 1):
      found['mkl'] = mkl.cblas_sgemm
  return {name: _caller(fn) for name, fn in found.items()}


def _caller(sgemm) -> Callable:
  def call(ta, tb, m, n, k, a, lda, b, ldb, c, ldc):
    sgemm(_ROW_MAJOR, _TRANS if ta else _NO_TRANS, _TRANS if tb else _NO_TRANS,
          m, n, k, ctypes.c_float(1.0), ctypes.c_void_p(a), lda,
          ctypes.c_void_p(b), ldb, ctypes.c_float(0.0), ctypes.c_void_p(c),
          ldc)
  return call


def _product(m: int, n: int, k: int, form: str, seed: int = 0):
  """(gemm -> None, FLOPs) for C = op(A) op(B) of the given shape."""
  ta, tb = form[0] == 'T', form[1] == 'T'
  rng = np.random.default_rng(seed)
  a = rng.standard_normal((k, m) if ta else (m, k), dtype=np.float32)
  b = rng.standard_normal((n, k) if tb else (k, n), dtype=np.float32)
  c = np.empty((m, n), np.float32)
  def run(gemm):
    gemm(ta, tb, m, n, k, a.ctypes.data, a.shape[1], b.ctypes.data,
         b.shape[1], c.ctypes.data, n)
  return run, 2.0 * m * n * k


def _parse_shape(text: str) -> tuple[int, int, int, str]:
  try:
    dims, form = text.split(':')
    m, n, k = (int(x) for x in dims.split('x'))
  except ValueError:
    raise argparse.ArgumentTypeError(
        f'{text!r}: expected MxNxK:FORM, e.g. 1024x512x512:NT') from None
  if form not in ('NN', 'NT', 'TN', 'TT') or min(m, n, k) < 1:
    raise argparse.ArgumentTypeError(
        f'{text!r}: positive sizes and a form of NN, NT, TN or TT')
  return m, n, k, form


def _positive(text: str) -> float:
  value = float(text)
  if value <= 0:
    raise argparse.ArgumentTypeError(f'{text}: must be positive')
  return value


def _rate(gemm, products, calls: int) -> float:
  """GFLOP/s of len(products) threads each calling its product `calls`
  times at once (a warm call each first)."""
  barrier = threading.Barrier(len(products) + 1)
  def work(run):
    run(gemm)
    barrier.wait()
    for _ in range(calls):
      run(gemm)
  threads = [threading.Thread(target=work, args=(run,))
             for run, _ in products]
  for thread in threads:
    thread.start()
  barrier.wait()
  start = time.perf_counter()
  for thread in threads:
    thread.join()
  seconds = time.perf_counter() - start
  return sum(flops for _, flops in products) * calls / seconds / 1e9


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--shapes', type=_parse_shape, nargs='+',
                      default=SHAPES, help='MxNxK:FORM ... (default: W1)')
  parser.add_argument('--rounds', type=lambda s: int(_positive(s)), default=5)
  parser.add_argument('--seconds', type=_positive, default=0.4,
                      help='about how long one round of one library runs')
  parser.add_argument('--threads', type=lambda s: int(_positive(s)),
                      default=len(os.sched_getaffinity(0)),
                      help='threads calling at once (besides one alone)')
  args = parser.parse_args(argv)
  libraries = _libraries()
  counts = sorted({1, args.threads})
  columns = [(name, t) for t in counts for name in libraries]
  print(f'single-threaded float32 GEMM, GFLOP/s (median of {args.rounds} '
        f'rounds; x N: N threads calling at once, rates summed); '
        f'libraries: {", ".join(libraries)}')
  print('| m, n, k | form | ' + ' | '.join(f'{n} x {t}' for n, t in columns)
        + ' |')
  print('|---|---|' + '---:|' * len(columns))
  for m, n, k, form in args.shapes:
    products = [_product(m, n, k, form, seed) for seed in range(max(counts))]
    calls = max(1, int(args.seconds * 100e9 / products[0][1]))  # ~100 GF/s
    rates = {column: [] for column in columns}
    for _ in range(args.rounds):
      for name, t in columns:
        rates[name, t].append(_rate(libraries[name], products[:t], calls))
    cells = ' | '.join(f'{statistics.median(rates[c]):.1f}' for c in columns)
    print(f'| {m}, {n}, {k} | {form} | {cells} |', flush=True)


if __name__ == '__main__':
  main()
