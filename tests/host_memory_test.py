"""experiments/host_memory.py: freed host memory kept for reuse (glibc)."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from experiments import host_memory

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Allocates, touches and frees a 256 MiB buffer 4 times, counting the minor
# page faults of the last 3: every page again under malloc's defaults (large
# blocks are mmap'd and unmapped on free), ~none once freed memory is kept.
_PROGRAM = textwrap.dedent('''
    import ctypes, resource, sys
    from experiments import host_memory
    retained = host_memory.configure(sys.argv[1])
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    faults = []
    for _ in range(4):
      before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      block = libc.malloc(2**28)  # 256 MiB, as XLA:CPU allocates its buffers
      ctypes.memset(block, 1, 2**28)  # every page touched
      libc.free(block)
      faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    import jax
    try:
      jax.devices()  # The backends are up: too late to change malloc.
    except RuntimeError:
      pass  # JAX_PLATFORMS names an accelerator this machine lacks.
    print(retained, sum(faults[1:]), host_memory.retain_freed_memory())
''')


def _run(mode, platforms='cpu'):
  env = dict(os.environ, JAX_PLATFORMS=platforms, PYTHONPATH=_ROOT)
  out = subprocess.run([sys.executable, '-c', _PROGRAM, mode], env=env,
                       capture_output=True, text=True, timeout=120, check=True)
  retained, faults, late = out.stdout.split()
  return retained == 'True', int(faults), late == 'True'


@pytest.mark.skipif(host_memory._glibc() is None, reason='needs glibc')
def test_retained_memory_is_reused_without_page_faults():
  pages = 3 * 256 * 2**20 // os.sysconf('SC_PAGE_SIZE')
  retained, faults, late = _run('auto')  # JAX_PLATFORMS=cpu: CPU only.
  assert retained and not late
  assert faults < 0.05 * pages
  retained, faults, _ = _run('system')
  assert not retained
  assert faults > 0.9 * pages


def test_auto_leaves_malloc_alone_when_an_accelerator_is_asked_for():
  retained, _, _ = _run('auto', platforms='cuda,cpu')
  assert not retained


def test_unknown_mode_is_a_clear_error():
  with pytest.raises(ValueError, match=r"--host_memory must be one of .*'x'"):
    host_memory.configure('x')


# Times nothing: counts the minor page faults of W2's train step at M = 1,024
# under malloc's defaults, its temporaries in one block ('one') or in the
# blocks of host_memory.compiler_options ('heaps'); prints the median over
# steps 4-11 (glibc's mmap threshold rises over the first frees).
_STEP_FAULTS = textwrap.dedent('''
    import resource, statistics, sys
    from experiments import host_memory
    host_memory.configure('system')
    import jax
    from experiments import parallel
    from launch import benchmark
    if sys.argv[1] == 'one':
      host_memory.compiler_options = lambda mesh: None
    config, batch_size = benchmark.workload('W2:side=32')
    step, state, sums, batch = benchmark.train_step_inputs(
        config, batch_size, parallel.make_mesh())
    faults = []
    for _ in range(12):
      before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      state, sums = jax.block_until_ready(step(state, sums, batch))
      faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(statistics.median(faults[4:]))
''')


def test_compiler_options_only_on_cpu_without_retained_memory(monkeypatch):
  class Device:
    def __init__(self, platform):
      self.platform = platform

  class Mesh:
    def __init__(self, *platforms):
      self.devices = np.array([Device(p) for p in platforms])

  assert host_memory.compiler_options(Mesh('cpu', 'cpu')) == {
      'xla_multiheap_size_constraint_per_heap': host_memory.CPU_HEAP_BYTES}
  assert host_memory.compiler_options(Mesh('gpu')) is None
  assert host_memory.compiler_options(Mesh('cpu', 'tpu')) is None
  monkeypatch.setattr(host_memory, '_retained', [True])
  assert host_memory.compiler_options(Mesh('cpu')) is None


@pytest.mark.skipif(host_memory._glibc() is None, reason='needs glibc')
def test_temporaries_in_small_blocks_are_reused_under_malloc_defaults():
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=_ROOT)
  faults = {}
  for layout in ('one', 'heaps'):
    out = subprocess.run([sys.executable, '-c', _STEP_FAULTS, layout],
                         env=env, cwd=_ROOT, capture_output=True, text=True,
                         timeout=300, check=True)
    faults[layout] = float(out.stdout.split()[-1])
  # One block: every page of the step's ~200 MB of temporaries each step.
  assert faults['one'] > 40_000, faults
  assert faults['heaps'] < 0.5 * faults['one'], faults
