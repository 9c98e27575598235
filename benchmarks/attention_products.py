r"""The batched attention products of W1, timed alone: XLA:CPU against torch.

  python benchmarks/attention_products.py                       # JAX (XLA:CPU)
  python benchmarks/attention_products.py --impl=native         # perceiver.native
  .venv-torch/bin/python benchmarks/attention_products.py --impl=torch
  XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=-individual_dot \
      python benchmarks/attention_products.py                   # Eigen dots

Every product that attention's forward and backward passes compute, on W1's
shapes (configs/w1.py): self-attention over B = 16 examples x H = 8 heads of
[N = 256, Q = 64] queries and keys, and the one-head cross-attention of
N = 256 latents over M = 4,096 inputs of width 133. Named by which operand
is read transposed (one matrix per batch element and head):

  NT  S = Q K^T    [N, Q] x [M, Q]^T  (logits; backward: dP = dO V^T)
  NN  O = P V      [N, M] x [M, Q]    (weighted sum; backward: dQ = dS K)
  TN  dV = P^T dO  [N, M]^T x [N, Q]  (backward: dV, and dK = dS^T Q)

Prints each product's best time over --rounds rounds of --iterations calls
and its rate in GFLOP/s, then a 2048^3 matmul's rate for the machine. Runs
under either interpreter without the project installed (argparse only), so
the peer's venv can run it as is.
"""

from __future__ import annotations

import argparse
import time

# (B, H, N, M, Q): W1's self-attention and cross-attention.
SHAPES = ((16, 8, 256, 256, 64), (16, 1, 256, 4096, 133))
SMALL_SHAPES = ((2, 2, 16, 16, 8), (2, 1, 16, 32, 8))
FORMS = ('NT', 'NN', 'TN')


def _best(call, iterations: int, rounds: int) -> float:
  """Best mean seconds per call over `rounds` rounds (after one warm call)."""
  call()
  best = float('inf')
  for _ in range(rounds):
    start = time.perf_counter()
    for _ in range(iterations):
      call()
    best = min(best, (time.perf_counter() - start) / iterations)
  return best


def _jax_calls(shape, matmul_n, use_native=False):
  import jax
  import jax.numpy as jnp
  b, h, n, m, q = shape
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  nq = jax.random.normal(keys[0], (b, h, n, q))
  mq = jax.random.normal(keys[1], (b, h, m, q))
  nm = jax.random.normal(keys[2], (b, h, n, m))
  if use_native:  # the project's FFI GEMMs (perceiver/native)
    import os
    import sys
    sys.path.insert(0, os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))))
    from perceiver import native
    if not native.available():
      raise SystemExit(f'perceiver.native: {native.why_unavailable()}')
    mm = native.matmul
    products = {
        'NT': (jax.jit(lambda x, y: mm(x, y, transpose_b=True)), nq, mq),
        'NN': (jax.jit(mm), nm, mq),
        'TN': (jax.jit(lambda x, y: mm(x, y, transpose_a=True)), nm, nq),
    }
  else:
    products = {
        'NT': (jax.jit(lambda x, y: jnp.einsum('bhnq,bhmq->bhnm', x, y)),
               nq, mq),
        'NN': (jax.jit(lambda x, y: jnp.einsum('bhnm,bhmq->bhnq', x, y)),
               nm, mq),
        'TN': (jax.jit(lambda x, y: jnp.einsum('bhnm,bhnq->bhmq', x, y)),
               nm, nq),
    }
  calls = {form: (lambda f=f, x=x, y=y: jax.block_until_ready(f(x, y)))
           for form, (f, x, y) in products.items()}
  a = jax.random.normal(keys[3], (matmul_n, matmul_n))
  square = jax.jit(lambda x: x @ x)
  return calls, lambda: jax.block_until_ready(square(a))


def _torch_calls(shape, matmul_n):
  import torch
  b, h, n, m, q = shape
  gen = torch.Generator().manual_seed(0)
  nq = torch.randn(b * h, n, q, generator=gen)
  mq = torch.randn(b * h, m, q, generator=gen)
  nm = torch.randn(b * h, n, m, generator=gen)
  calls = {'NT': lambda: torch.bmm(nq, mq.transpose(1, 2)),
           'NN': lambda: torch.bmm(nm, mq),
           'TN': lambda: torch.bmm(nm.transpose(1, 2), nq)}
  a = torch.randn(matmul_n, matmul_n, generator=gen)
  return calls, lambda: a @ a


def measure(impl: str, shapes, iterations: int, rounds: int,
            matmul_n: int) -> list[dict]:
  """One row per (shape, form): seconds and GFLOP/s; then the matmul row."""
  if impl == 'torch':
    import os
    import torch
    torch.set_num_threads(len(os.sched_getaffinity(0)))
  make = {'torch': _torch_calls, 'jax': _jax_calls,
          'native': lambda *a: _jax_calls(*a, use_native=True)}[impl]
  rows, square = [], None
  for shape in shapes:
    b, h, n, m, q = shape
    calls, square = make(shape, matmul_n)
    flop = 2 * b * h * n * m * q
    for form in FORMS:
      seconds = _best(calls[form], iterations, rounds)
      rows.append({'shape': shape, 'form': form, 'seconds': seconds,
                   'gflops': flop / seconds / 1e9})
  seconds = _best(square, max(1, iterations // 4), rounds)
  rows.append({'shape': (matmul_n,) * 3, 'form': 'matmul', 'seconds': seconds,
               'gflops': 2 * matmul_n ** 3 / seconds / 1e9})
  return rows


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--impl', choices=('jax', 'native', 'torch'),
                      default='jax')
  parser.add_argument('--iterations', type=int, default=20)
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--matmul_n', type=int, default=2048)
  parser.add_argument('--small', action='store_true',
                      help='tiny shapes (a smoke test, not a measurement)')
  args = parser.parse_args(argv)
  if args.iterations <= 0 or args.rounds <= 0 or args.matmul_n <= 0:
    parser.error('--iterations, --rounds and --matmul_n must be positive')
  rows = measure(args.impl, SMALL_SHAPES if args.small else SHAPES,
                 args.iterations, args.rounds, args.matmul_n)
  print(f'{args.impl}: best of {args.rounds} rounds of {args.iterations} '
        'calls')
  print('| B, H, N, M, Q | product | ms | GFLOP/s |')
  print('|---|---|---:|---:|')
  for row in rows:
    shape = ', '.join(str(d) for d in row['shape'])
    print(f"| {shape} | {row['form']} | {row['seconds'] * 1e3:.2f} | "
          f"{row['gflops']:.0f} |")


if __name__ == '__main__':
  main()
