"""Building, loading and registering the library (perceiver/native/*.cc),
and counting the FLOPs of its calls in compiled HLO."""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import importlib.metadata
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
from jax.experimental.custom_partitioning import custom_partitioning
import jax.numpy as jnp

_DIR = pathlib.Path(__file__).parent
_SOURCES = tuple(_DIR / name for name in (
    'batched_matmul.cc', 'fused_attention.cc', 'factored_attention.cc',
    'layer_norm.cc'))
_HEADERS = (_DIR / 'common.h', _DIR / 'row_math.h')
_F32, _F64 = jnp.dtype(jnp.float32), jnp.dtype(jnp.float64)
MATMUL_TARGETS = {_F32: 'perceiver_batched_matmul_f32',
                   _F64: 'perceiver_batched_matmul_f64'}
PAIR_TARGETS = {_F32: 'perceiver_matmul_pair_f32',
                _F64: 'perceiver_matmul_pair_f64'}
ATTENTION_TARGETS = {
    dtype: {kind: f'perceiver_attention_{kind}_{name}'
            for kind in ('forward', 'backward', 'packed')}
    for dtype, name in ((_F32, 'f32'), (_F64, 'f64'))}
FACTORED_TARGETS = {
    dtype: {kind: f'perceiver_factored_attention_{kind}_{name}'
            for kind in ('forward', 'backward')}
    for dtype, name in ((_F32, 'f32'), (_F64, 'f64'))}
LAYER_NORM_TARGETS = {
    dtype: {kind: f'perceiver_layer_norm_{kind}_{name}'
            for kind in ('forward', 'backward')}
    for dtype, name in ((_F32, 'f32'), (_F64, 'f64'))}
_SYMBOLS = {'perceiver_batched_matmul_f32': 'PerceiverBatchedMatmulF32',
            'perceiver_batched_matmul_f64': 'PerceiverBatchedMatmulF64',
            'perceiver_matmul_pair_f32': 'PerceiverMatmulPairF32',
            'perceiver_matmul_pair_f64': 'PerceiverMatmulPairF64',
            'perceiver_attention_forward_f32': 'PerceiverAttentionForwardF32',
            'perceiver_attention_backward_f32': 'PerceiverAttentionBackwardF32',
            'perceiver_attention_packed_f32':
                'PerceiverAttentionBackwardPackedF32',
            'perceiver_attention_forward_f64': 'PerceiverAttentionForwardF64',
            'perceiver_attention_backward_f64': 'PerceiverAttentionBackwardF64',
            'perceiver_attention_packed_f64':
                'PerceiverAttentionBackwardPackedF64',
            'perceiver_factored_attention_forward_f32':
                'PerceiverFactoredAttentionForwardF32',
            'perceiver_factored_attention_backward_f32':
                'PerceiverFactoredAttentionBackwardF32',
            'perceiver_factored_attention_forward_f64':
                'PerceiverFactoredAttentionForwardF64',
            'perceiver_factored_attention_backward_f64':
                'PerceiverFactoredAttentionBackwardF64',
            'perceiver_layer_norm_forward_f32': 'PerceiverLayerNormForwardF32',
            'perceiver_layer_norm_backward_f32':
                'PerceiverLayerNormBackwardF32',
            'perceiver_layer_norm_forward_f64': 'PerceiverLayerNormForwardF64',
            'perceiver_layer_norm_backward_f64':
                'PerceiverLayerNormBackwardF64'}
INT32_MAX = 2**31 - 1  # OpenBLAS's (LP64) largest dimension
BLAS_SETTINGS = ('auto', 'openblas', 'mkl')  # $PERCEIVER_BLAS
# mkl_service.h: MKL_THREADING_SEQUENTIAL, MKL_INTERFACE_LP64.
_MKL_SEQUENTIAL, _MKL_LP64 = 1, 0

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


def _cpuinfo(*keys: str) -> str | None:
  """The value of the first /proc/cpuinfo line that starts with one of
  `keys` (Linux), else None."""
  try:
    with open('/proc/cpuinfo', encoding='ascii', errors='replace') as f:
      for line in f:
        if line.startswith(keys):
          return line.split(':', 1)[-1].strip()
  except OSError:
    pass
  return None


def _processor() -> bytes:
  """What -march=native compiles for: the processor's feature flags (Linux),
  else the platform's own description."""
  flags = _cpuinfo('flags', 'Features')
  if flags is not None:
    return flags.encode()
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


def mkl_path() -> pathlib.Path | None:
  """libmkl_rt of the `mkl` wheel (requirements.txt, x86-64 Linux), if
  installed."""
  try:
    files = importlib.metadata.files('mkl') or []
  except importlib.metadata.PackageNotFoundError:
    return None
  for file in files:
    if file.name.startswith('libmkl_rt.so'):
      return pathlib.Path(file.locate()).resolve()
  return None


def blas_choice(setting: str, vendor: str, mkl_installed: bool) -> str:
  """Which GEMMs the library calls: 'mkl' or 'openblas'.

  `setting` is $PERCEIVER_BLAS: 'openblas', 'mkl' (where installed), or
  'auto' (the default): MKL on Intel processors, OpenBLAS elsewhere. On W1's
  shapes MKL's sequential GEMM was the faster on an Intel Xeon with AVX-512,
  OpenBLAS's on an AMD EPYC with AVX2 (benchmarks/RESULTS.md;
  benchmarks/gemm_rates.py measures a machine).
  """
  if setting not in BLAS_SETTINGS:
    raise BuildError(f'PERCEIVER_BLAS={setting!r}: expected one of '
                     f'{", ".join(BLAS_SETTINGS)}')
  if setting == 'openblas' or not mkl_installed:
    return 'openblas'
  if setting == 'mkl' or vendor == 'GenuineIntel':
    return 'mkl'
  return 'openblas'


def _use_blas(library: ctypes.CDLL) -> str:
  """Hands the library MKL's sequential GEMMs where `blas_choice` picks
  them; returns the name of the BLAS in use."""
  setting = os.environ.get('PERCEIVER_BLAS', 'auto')
  path = mkl_path()
  vendor = _cpuinfo('vendor_id') or ''
  choice = blas_choice(setting, vendor, path is not None)
  if setting == 'mkl' and path is None:
    logging.warning('PERCEIVER_BLAS=mkl, but the mkl wheel is not installed '
                    '(requirements.txt): using OpenBLAS')
  if choice == 'openblas':
    return choice
  try:
    mkl = ctypes.CDLL(str(path))
    # Before MKL's first computation; refused (another value returned) if
    # MKL already runs in this process with other layers.
    if (mkl.MKL_Set_Interface_Layer(_MKL_LP64) != _MKL_LP64 or
        mkl.MKL_Set_Threading_Layer(_MKL_SEQUENTIAL) != _MKL_SEQUENTIAL):
      raise OSError('MKL would not switch to its sequential LP64 layers')
    gemms = [ctypes.cast(getattr(mkl, name), ctypes.c_void_p)
             for name in ('cblas_sgemm', 'cblas_dgemm')]
  except (OSError, AttributeError) as e:
    logging.warning('MKL (%s) unusable, using OpenBLAS: %s', path, e)
    return 'openblas'
  library.PerceiverUseGemm(*gemms)
  _state['mkl'] = mkl
  return choice


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
      _state['blas'] = _use_blas(library)
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


def blas() -> str | None:
  """The GEMMs the library calls ('mkl' or 'openblas'; `blas_choice`), or
  None where the library is unavailable."""
  return str(_state['blas']) if _load() else None


@contextlib.contextmanager
def gemms_skipped():
  """Within: every GEMM of the library returns at once without computing.

  A diagnostic, not a mode: what the library's calls return is meaningless
  (their products are left as the output buffers were). Timing a compiled
  step with and without it splits the step into its matrix products and the
  rest (benchmarks/gemm_share.py). XLA's own dots are not affected. Enter
  and leave it between calls, not while a computation runs (the GEMMs are
  one plain pointer each). Raises BuildError where the library is
  unavailable.
  """
  if not _load():
    raise BuildError(f'perceiver.native unavailable: {_state.get("why")}')
  library = _state['library']
  sgemm, dgemm = ctypes.c_void_p(), ctypes.c_void_p()
  with _lock:
    library.PerceiverSkipGemms(ctypes.byref(sgemm), ctypes.byref(dgemm))
  try:
    yield
  finally:
    with _lock:
      library.PerceiverUseGemm(sgemm, dgemm)


def why_unavailable() -> str | None:
  """The reason `available()` is False, or None."""
  return None if _load() else str(_state.get('why'))


def runs_here(*sizes: int) -> bool:
  """Whether a call of the library can compute here: the default backend is
  the CPU, the library is built, and no dimension (`sizes`) passes OpenBLAS's
  and MKL's 32-bit limit. (On a GPU or TPU host it is not even built.)"""
  return (max(sizes, default=0) <= INT32_MAX
          and jax.default_backend() == 'cpu' and available())


def replicated(arg_shapes):
  """The sharding of the whole array on every device of the operands: a
  partition callback's answer when the operands carry HLO shardings, not
  ones over a mesh (every device then computes the whole, as XLA would)."""
  from jax._src import sharding_impls  # pylint: disable=g-import-not-at-top
  devices = arg_shapes[0].sharding._device_assignment  # pylint: disable=protected-access
  return sharding_impls.GSPMDSharding.get_replicated(devices)


def partitioned(call, shardings, sharding_rule: str, num_results: int):
  """`call` (an FFI call on arrays as they are) under custom_partitioning:
  each device calls it on its own shards, laid out as `shardings(arg_shapes,
  result_shapes)` says ((result shardings, operand shardings)), or, where
  that is None (shardings given as HLO shardings, not over a mesh, so no
  axes to name), every device computes the whole, as XLA would."""

  def infer(mesh, arg_shapes, result_shape):
    del mesh
    found = shardings(arg_shapes, result_shape)
    return None if found is None else found[0]

  def partition(mesh, arg_shapes, result_shape):
    found = shardings(arg_shapes, result_shape)
    if found is None:
      whole = replicated(arg_shapes)
      out = (whole,) * num_results if num_results > 1 else whole
      return mesh, call, out, (whole,) * len(arg_shapes)
    return (mesh, call) + found

  wrapped = custom_partitioning(call)
  wrapped.def_partition(partition, infer_sharding_from_operands=infer,
                        sharding_rule=sharding_rule)
  return wrapped


def broadcast_unmapped(axis_size: int, in_batched, operands) -> list:
  """A vmap rule's operands with the vmapped axis leading on each: the
  unmapped ones broadcast along it."""
  return [x if mapped else jnp.broadcast_to(x, (axis_size,) + x.shape)
          for x, mapped in zip(operands, in_batched)]


_CALL = re.compile(
    r'custom_call_target="perceiver_(\w+?)_f(?:32|64)", '
    r'operand_layout_constraints=\{(.*?)\}, api_version.*?'
    r'backend_config=\{([^}]*)\}')
_SHAPE = re.compile(r'\w+\[([\d,]*)\]')
_ATTRIBUTE = re.compile(r'(\w+) = (\w+)')


def hlo_flops(hlo_text: str) -> float:
  """FLOPs of this library's calls in a compiled module's HLO text (2 per
  multiply-add of their products). XLA's cost analysis does not see into
  custom calls: add this to `compiled.cost_analysis()['flops']` for the
  module's total.

  A matmul's are 2 m n k per element (a pair's, the sum of its two);
  attention's, with H heads of q and k of width Dq and of v of width Dv
  over N queries and M keys, 2 H N M (Dq + Dv) per element forward
  (q k^T, P v) and 2 H N M (3 Dq + 2 Dv) backward (q k^T again, P^T dO,
  dO V^T, dS K, dS^T Q). Factored
  attention's (N queries shared by B examples, per head): 2 N M (D + B E)
  forward (q pk^T once, R pv per example) and 2 N M (3 D + 2 B E) backward
  (q pk^T, E^T q and E pk once; dO pv^T and R^T dO per example).
  """
  total = 0
  for match in _CALL.finditer(hlo_text):
    kind, operands, config = match.groups()
    shapes = [[int(d) for d in dims.split(',') if d]
              for dims in _SHAPE.findall(operands)]
    attrs = dict(_ATTRIBUTE.findall(config))
    if kind in ('batched_matmul', 'matmul_pair'):
      suffixes = ('',) if kind == 'batched_matmul' else ('1', '2')
      for i, suffix in enumerate(suffixes):
        a, b = shapes[2 * i:2 * i + 2]
        transposed = lambda x: attrs[f'transpose_{x}{suffix}'] == 'true'
        m, k = (a[-1], a[-2]) if transposed('a') else a[-2:]
        n = b[-2] if transposed('b') else b[-1]
        total += 2 * math.prod(a[:-2]) * m * n * k
    elif kind.startswith('attention_'):
      q, k = shapes[:2]
      heads, d, e = (int(attrs[x]) for x in ('heads', 'qk_dim', 'v_dim'))
      pairs = q[0] * heads * q[1] * (q[1] if kind == 'attention_packed'
                                     else k[1])  # B H N M
      total += 2 * pairs * ((d + e) if kind == 'attention_forward' else
                            (3 * d + 2 * e))
    elif kind.startswith('factored_attention_'):
      (n, width), (b, m, _), pv = shapes[0], shapes[1], shapes[7]
      heads = int(attrs['heads'])
      d, e = width // heads, pv[1] // heads
      per_head = (2 * n * m * (d + b * e) if kind.endswith('forward') else
                  2 * n * m * (3 * d + 2 * b * e))
      total += heads * per_head
  return float(total)
