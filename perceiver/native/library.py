"""Building, loading and registering the library (perceiver/native/*.cc),
and counting the FLOPs of its calls in compiled HLO."""

from __future__ import annotations

import ctypes
import hashlib
import math
import os
import pathlib
import platform
import re
import shutil
import subprocess
import tempfile
import threading

from absl import logging
import jax
import jax.numpy as jnp

_DIR = pathlib.Path(__file__).parent
_SOURCES = tuple(_DIR / name
                 for name in ('batched_matmul.cc', 'fused_attention.cc'))
_HEADERS = (_DIR / 'common.h',)
_F32, _F64 = jnp.dtype(jnp.float32), jnp.dtype(jnp.float64)
MATMUL_TARGETS = {_F32: 'perceiver_batched_matmul_f32',
                   _F64: 'perceiver_batched_matmul_f64'}
ATTENTION_TARGETS = {
    dtype: {kind: f'perceiver_attention_{kind}_{name}'
            for kind in ('forward', 'backward', 'packed')}
    for dtype, name in ((_F32, 'f32'), (_F64, 'f64'))}
_SYMBOLS = {'perceiver_batched_matmul_f32': 'PerceiverBatchedMatmulF32',
            'perceiver_batched_matmul_f64': 'PerceiverBatchedMatmulF64',
            'perceiver_attention_forward_f32': 'PerceiverAttentionForwardF32',
            'perceiver_attention_backward_f32': 'PerceiverAttentionBackwardF32',
            'perceiver_attention_packed_f32':
                'PerceiverAttentionBackwardPackedF32',
            'perceiver_attention_forward_f64': 'PerceiverAttentionForwardF64',
            'perceiver_attention_backward_f64': 'PerceiverAttentionBackwardF64',
            'perceiver_attention_packed_f64':
                'PerceiverAttentionBackwardPackedF64'}
INT32_MAX = 2**31 - 1  # OpenBLAS's (LP64) largest dimension

_lock = threading.Lock()
_state: dict[str, object] = {}


class BuildError(RuntimeError):
  """The library could not be compiled or loaded (the message says why)."""


def _cache_dir() -> pathlib.Path:
  if os.environ.get('PERCEIVER_NATIVE_CACHE'):
    return pathlib.Path(os.environ['PERCEIVER_NATIVE_CACHE'])
  base = os.environ.get('XDG_CACHE_HOME') or os.path.expanduser('~/.cache')
  return pathlib.Path(base) / 'perceiver' / 'native'


def _toolchain():
  """(compiler, FFI include dir, OpenBLAS include dir, OpenBLAS lib dir)."""
  compiler = os.environ.get('CXX') or shutil.which('g++') or shutil.which('c++')
  if not compiler:
    raise BuildError('no C++ compiler (set CXX, or install g++)')
  try:
    import scipy_openblas32  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise BuildError('the scipy-openblas32 wheel is not installed '
                     '(requirements.txt)') from e
  return (compiler, jax.ffi.include_dir(), scipy_openblas32.get_include_dir(),
          scipy_openblas32.get_lib_dir())


def _processor() -> bytes:
  """What -march=native compiles for: the processor's feature flags (Linux),
  else the platform's own description."""
  try:
    with open('/proc/cpuinfo', 'rb') as f:
      for line in f:
        if line.startswith((b'flags', b'Features')):
          return line.strip()
  except OSError:
    pass
  return f'{platform.machine()} {platform.processor()}'.encode()


def build() -> pathlib.Path:
  """Compiles the library's sources (if not cached) and returns it."""
  compiler, ffi_include, blas_include, blas_lib = _toolchain()
  key = hashlib.sha256(b'\0'.join(
      [f.read_bytes() for f in _SOURCES + _HEADERS]
      + [compiler.encode(), ffi_include.encode(), blas_include.encode(),
         blas_lib.encode(), jax.__version__.encode(), _processor()])
  ).hexdigest()[:16]
  path = _cache_dir() / f'libperceiver_native_{key}.so'
  if path.exists():
    return path
  path.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
    out = pathlib.Path(tmp) / path.name
    command = [compiler, '-O3', '-march=native', '-fopenmp-simd',
               '-std=c++17', '-shared', '-fPIC', '-w', f'-I{ffi_include}',
               f'-I{blas_include}', *map(str, _SOURCES), f'-L{blas_lib}',
               '-lscipy_openblas', f'-Wl,-rpath,{blas_lib}', '-o', str(out)]
    result = subprocess.run(command, capture_output=True, text=True,
                            check=False)
    if result.returncode:
      lines = result.stderr.strip().splitlines() or ['(no output)']
      first = next((l for l in lines if 'error' in l), lines[-1])
      names = ', '.join(f.name for f in _SOURCES)
      raise BuildError(f'{compiler} failed on {names}: {first}')
    os.replace(out, path)  # atomic: concurrent builds leave one whole file
  return path


def _load():
  """Builds, loads and registers the library once; False if unavailable."""
  with _lock:
    if 'ok' in _state:
      return _state['ok']
    _state['ok'] = False
    if os.environ.get('PERCEIVER_NATIVE', '1') == '0':
      _state['why'] = 'PERCEIVER_NATIVE=0'
      return False
    try:
      library = ctypes.CDLL(str(build()))
      library.PerceiverBlasSingleThreaded()
      for target, symbol in _SYMBOLS.items():
        jax.ffi.register_ffi_target(
            target, jax.ffi.pycapsule(getattr(library, symbol)),
            platform='cpu')
    except (BuildError, OSError, AttributeError) as e:
      _state['why'] = str(e)
      logging.warning('perceiver.native unavailable, using XLA: %s', e)
      return False
    _state['library'] = library
    _state['ok'] = True
    return True


def available() -> bool:
  """Whether the CPU library is built and registered (builds it if needed)."""
  return _load()


def why_unavailable() -> str | None:
  """The reason `available()` is False, or None."""
  return None if _load() else str(_state.get('why'))


_SHAPE = r'\w+\[([\d,]*)\](?:\{[^}]*\})?'
_MATMUL_CALL = re.compile(
    r'= ' + _SHAPE + r' custom-call\(.*?custom_call_target='
    r'"perceiver_batched_matmul_f(?:32|64)".*?operand_layout_constraints='
    r'\{' + _SHAPE + r', .*?transpose_a = (true|false)')
_ATTENTION_CALL = re.compile(
    r'custom_call_target="perceiver_attention_(forward|backward|packed)_f'
    r'(?:32|64)".*?operand_layout_constraints=\{' + _SHAPE + ', ' + _SHAPE
    + r'.*?backend_config=\{([^}]*)\}')
_ATTRIBUTE = re.compile(r'(\w+) = (\d+) : i64')


def hlo_flops(hlo_text: str) -> float:
  """FLOPs of this library's calls in a compiled module's HLO text (2 per
  multiply-add of their products). XLA's cost analysis does not see into
  custom calls: add this to `compiled.cost_analysis()['flops']` for the
  module's total.

  A matmul's are 2 m n k per element; attention's, with H heads of q and k
  of width Dq and of v of width Dv over N queries and M keys, 2 H N M
  (Dq + Dv) per element forward (q k^T, P v) and 2 H N M (3 Dq + 2 Dv)
  backward (q k^T again, P^T dO, dO V^T, dS K, dS^T Q).
  """
  dims = lambda text: [int(d) for d in text.split(',') if d]
  total = 0
  for match in _MATMUL_CALL.finditer(hlo_text):
    out, a, transpose_a = match.groups()
    k = dims(a)[-2] if transpose_a == 'true' else dims(a)[-1]
    total += 2 * math.prod(dims(out)) * k
  for match in _ATTENTION_CALL.finditer(hlo_text):
    kind, q, second, config = match.groups()
    attrs = {k: int(v) for k, v in _ATTRIBUTE.findall(config)}
    b, n = dims(q)[:2]
    m = n if kind == 'packed' else dims(second)[1]  # packed: q, k = qkv
    dq, dv = attrs['qk_dim'], attrs['v_dim']
    per_pair = 2 * n * m * ((dq + dv) if kind == 'forward' else
                            (3 * dq + 2 * dv))
    total += b * attrs['heads'] * per_pair
  return float(total)
