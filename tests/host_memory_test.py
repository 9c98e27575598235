"""experiments/host_memory.py: freed host memory kept for reuse (glibc)."""

import os
import subprocess
import sys
import textwrap

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
