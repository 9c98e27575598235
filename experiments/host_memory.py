"""Host memory reuse for XLA:CPU: freed buffers stay in the process.

XLA:CPU allocates each step's buffers with malloc and frees them when the
step ends. glibc gives large blocks back to the kernel (they are mmap'd, or
sit at the top of a per-thread heap that it trims), so the next step faults
every page in again and the kernel zeroes it. On workload W1 that is ~450k
minor page faults (~1.8 GB of fresh pages) per train step; on 2 cores it
costs ~15% of the step (`python -m launch.benchmark --workload=W1
--host_memory=system` against the default).

`retain_freed_memory()` sets three glibc malloc parameters so that freed
memory is reused instead:

  M_ARENA_MAX=1       every thread allocates from the main heap (per-thread
                      heaps are trimmed on free regardless of the others);
  M_MMAP_MAX=0        large blocks come from the heap, not from mmap;
  M_TRIM_THRESHOLD=-1 the heap is never given back to the kernel.

The price: the process keeps its peak heap, compilation's included, with
fragmentation on top (the peak resident memory of both policies is measured
in README.md and benchmarks/RESULTS.md), and all threads share one malloc
lock, which a busy multi-threaded input pipeline on a large accelerator host
could feel. Hence `auto` (the runner's and benchmark's default) retains only
when the process computes on CPU alone.

It must run before JAX starts its backends: a thread keeps the heap it first
allocated from.

Where freed memory is not retained, `compiler_options(mesh)` has a CPU
step's temporaries compiled in blocks of at most 8 MiB instead of one, which
malloc's heap reuses from step to step (experiments/steps.py passes it to
jax.jit): fewer faults for a larger resident heap.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.metadata
import importlib.util

from absl import flags
from absl import logging
import jax
from jax._src import xla_bridge  # backends_are_initialized has no public name.

MODES = ('auto', 'retain', 'system')

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h).
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

_retained = [False]  # whether retain_freed_memory has taken effect here


def _glibc():
  """The process's C library if it is glibc (it has mallopt), else None."""
  try:
    libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
  except OSError:
    return None
  if not hasattr(libc, 'mallopt') or not hasattr(libc, 'gnu_get_libc_version'):
    return None
  return libc


def cpu_only() -> bool:
  """Whether this process will compute on CPU only, without starting JAX.

  True when `jax_platforms` (JAX_PLATFORMS) names only cpu, or, when it is
  unset, when no accelerator plugin (libtpu, a `jax_plugins` entry point or
  package such as the CUDA plugin) is installed.
  """
  platforms = jax.config.jax_platforms
  if platforms:
    return set(platforms.split(',')) == {'cpu'}
  if importlib.util.find_spec('libtpu') is not None:
    return False
  if importlib.metadata.entry_points(group='jax_plugins'):
    return False
  return importlib.util.find_spec('jax_plugins') is None


def retain_freed_memory() -> bool:
  """Sets glibc malloc to keep freed memory for reuse; returns whether it did.

  Does nothing (and says why in the log) where the C library is not glibc or
  JAX's backends have already started.
  """
  if xla_bridge.backends_are_initialized():
    logging.warning('host_memory: JAX backends already started; malloc left '
                    'as it is (call retain_freed_memory before using JAX).')
    return False
  libc = _glibc()
  if libc is None:
    logging.info('host_memory: not glibc; malloc left as it is.')
    return False
  ok = all(libc.mallopt(param, value) == 1 for param, value in (
      (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1)))
  if not ok:
    logging.warning('host_memory: glibc refused a mallopt setting.')
  _retained[0] = _retained[0] or ok
  return ok


CPU_HEAP_BYTES = 8 * 2**20  # compiler_options' largest block of temporaries


def compiler_options(mesh) -> dict[str, int] | None:
  """XLA options for a step jitted over `mesh`: on CPU, where freed memory is
  not retained (`retain_freed_memory`), the step's temporaries in blocks
  ("heaps") of at most CPU_HEAP_BYTES instead of one (an array larger than
  that gets a block of its own); otherwise None.

  XLA:CPU mallocs a step's temporaries and frees them when it ends. Under
  malloc's defaults glibc maps a block above its mmap threshold afresh (the
  threshold starts at 128 KiB and rises, to at most 32 MiB, to the size of
  each mapped block freed), and the kernel faults in and zeroes every page
  of it again at the next step. Blocks of 8 MiB fall under the threshold
  once it has risen and are mostly reused from malloc's heap (what glibc
  trims off the heap's top is faulted in again). The price is the heap
  malloc keeps: the process's peak resident memory grows. With freed memory
  retained nothing is mapped afresh either way, so the blocks would cost
  memory for no speed. Measurements (faults, step times, resident memory):
  benchmarks/RESULTS.md (2026-12-07, "XLA's temporaries in 8 MiB blocks").
  """
  if _retained[0] or {d.platform for d in mesh.devices.flat} != {'cpu'}:
    return None
  return {'xla_multiheap_size_constraint_per_heap': CPU_HEAP_BYTES}


def define_flag() -> flags.FlagHolder:
  """Defines --host_memory (for a program's own flags; see `configure`)."""
  return flags.DEFINE_enum(
      'host_memory', 'auto', list(MODES),
      'Keep freed host memory for reuse instead of returning it to the OS '
      '(glibc malloc; 10-15% faster steps on CPU, a larger resident heap): '
      'auto = when computing on CPU only; system = malloc\'s defaults. See '
      'experiments/host_memory.py.')


def configure(mode: str) -> bool:
  """Applies a --host_memory mode; returns whether freed memory is retained.

  'retain': always; 'system': never (malloc's defaults); 'auto': retain when
  the process computes on CPU only (`cpu_only`).
  """
  if mode not in MODES:
    raise ValueError(f'--host_memory must be one of {MODES}, got {mode!r}.')
  if mode == 'system' or (mode == 'auto' and not cpu_only()):
    logging.info('host_memory: malloc defaults (--host_memory=%s).', mode)
    return False
  retained = retain_freed_memory()
  if retained:
    logging.info('host_memory: freed host memory is kept for reuse.')
  return retained
