"""native.matmul: op(a) @ op(b) over matching leading axes, on the CPU as
batched_matmul.cc's GEMMs, MKL's or OpenBLAS's (see __init__.py)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import custom_batching
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from perceiver.native import library

def _out_shape(a, b, transpose_a, transpose_b):
  if a.ndim < 2 or b.ndim < 2:
    raise ValueError(f'matmul: operands need 2 or more axes; got a {a.shape},'
                     f' b {b.shape}.')
  m, k = a.shape[-2:][::-1] if transpose_a else a.shape[-2:]
  k_b, n = b.shape[-2:][::-1] if transpose_b else b.shape[-2:]
  if a.shape[:-2] != b.shape[:-2] or k != k_b:
    raise ValueError(
        f'matmul: op(a) @ op(b) needs the same leading axes and contracting '
        f'sizes; got a {a.shape} (transpose_a={transpose_a}), b {b.shape} '
        f'(transpose_b={transpose_b}).')
  return a.shape[:-2] + (m, n)


def _xla_product(a, b, transpose_a, transpose_b):
  batch = tuple(range(a.ndim - 2))
  contract_a = a.ndim - 2 if transpose_a else a.ndim - 1
  contract_b = b.ndim - 1 if transpose_b else b.ndim - 2
  # dot_general puts a's free axis before b's: [..., m, n] as asked.
  return jax.lax.dot_general(a, b, (((contract_a,), (contract_b,)),
                                    (batch, batch)))


def _library_call(a, b, transpose_a: bool, transpose_b: bool):
  """The FFI call on arrays as they are (one device's shard, or all)."""
  call = jax.ffi.ffi_call(
      library.MATMUL_TARGETS[jnp.dtype(a.dtype)],
      jax.ShapeDtypeStruct(_out_shape(a, b, transpose_a, transpose_b),
                           a.dtype))
  return call(a, b, transpose_a=transpose_a, transpose_b=transpose_b)


def _axes(transpose_a, transpose_b, rank):
  """(m, k) axes of a and (k, n) axes of b, counted from the front."""
  m_a, k_a = (rank - 1, rank - 2) if transpose_a else (rank - 2, rank - 1)
  k_b, n_b = (rank - 1, rank - 2) if transpose_b else (rank - 2, rank - 1)
  return m_a, k_a, k_b, n_b


def _split(transpose_a, transpose_b, a_spec, b_spec, rank):
  """How each device's product is laid out over the mesh: the specs asked of
  a, b and the result, and the mesh axes over which the contraction is split.

  Batch axes follow a's sharding, m a's, n b's, k a's (b is resharded to
  match); a mesh axis already used by an earlier of those is dropped."""
  pad = lambda spec: tuple(spec) + (None,) * (rank - len(tuple(spec)))
  a_spec, b_spec = pad(a_spec), pad(b_spec)
  m_a, k_a, k_b, n_b = _axes(transpose_a, transpose_b, rank)
  used = set()

  def take(entry):
    names = () if entry is None else (
        (entry,) if isinstance(entry, str) else tuple(entry))
    kept = tuple(n for n in names if n not in used)
    used.update(kept)
    return kept[0] if len(kept) == 1 else (kept or None)

  batch = [take(a_spec[i]) for i in range(rank - 2)]
  m, k, n = take(a_spec[m_a]), take(a_spec[k_a]), take(b_spec[n_b])
  spec_a, spec_b = batch + [None, None], batch + [None, None]
  spec_a[m_a], spec_a[k_a], spec_b[k_b], spec_b[n_b] = m, k, k, n
  k_axes = () if k is None else ((k,) if isinstance(k, str) else k)
  return P(*spec_a), P(*spec_b), P(*batch, m, n), k_axes


def _mesh_split(transpose_a, transpose_b, arg_shapes):
  """(mesh, `_split`'s four) for operands sharded over a mesh, else None."""
  a, b = arg_shapes
  if not all(isinstance(x.sharding, NamedSharding) for x in arg_shapes):
    return None
  return (a.sharding.mesh,) + _split(transpose_a, transpose_b,
                                     a.sharding.spec, b.sharding.spec,
                                     len(a.shape))


def _partition(transpose_a, transpose_b, mesh, arg_shapes, result_shape):
  """custom_partitioning's callback: each device multiplies its own shards;
  a contraction split over devices (x^T g with the batch's rows sharded) is
  summed across them."""
  del result_shape
  split = _mesh_split(transpose_a, transpose_b, arg_shapes)
  if split is None:
    # No mesh to name axes by (shardings given as HLO shardings, not over a
    # mesh): every device computes the whole product, as XLA would.
    whole = library.replicated(arg_shapes)
    return mesh, functools.partial(
        _library_call, transpose_a=transpose_a, transpose_b=transpose_b
    ), whole, (whole, whole)
  mesh, spec_a, spec_b, spec_out, k_axes = split

  def lower(x, y):
    out = _library_call(x, y, transpose_a, transpose_b)
    return jax.lax.psum(out, k_axes) if k_axes else out

  named = lambda spec: NamedSharding(mesh, spec)
  return mesh, lower, named(spec_out), (named(spec_a), named(spec_b))


def _infer_sharding(transpose_a, transpose_b, mesh, arg_shapes, result_shape):
  del mesh, result_shape
  split = _mesh_split(transpose_a, transpose_b, arg_shapes)
  return None if split is None else NamedSharding(split[0], split[3])


def _sharding_rule(transpose_a, transpose_b, mesh, operand_types,
                   result_types):
  del mesh, operand_types, result_types
  a = 'k m' if transpose_a else 'm k'
  b = 'n k' if transpose_b else 'k n'
  return f'... {a}, ... {b} -> ... m n', {'reduction_factors': ('k',)}


# (The module's docstring says why: XLA cannot see into the FFI call.)
_partitioned_call = custom_partitioning(_library_call, static_argnums=(2, 3))
_partitioned_call.def_partition(
    _partition, infer_sharding_from_operands=_infer_sharding,
    sharding_rule=_sharding_rule)


@functools.cache
def _cpu_product(transpose_a: bool, transpose_b: bool):
  """The partitioned call for one pair of flags, with its vmap rule: the
  mapped axis becomes a leading (batch) axis of both operands."""

  @custom_batching.custom_vmap
  def product(a, b):
    return _partitioned_call(a, b, transpose_a, transpose_b)

  @product.def_vmap
  def product_vmap(axis_size, in_batched, a, b):
    return product(*library.broadcast_unmapped(axis_size, in_batched,
                                               (a, b))), True

  return product


def _product(a, b, transpose_a: bool, transpose_b: bool):
  """op(a) @ op(b): the library on the CPU, XLA's dot elsewhere."""
  _out_shape(a, b, transpose_a, transpose_b)  # checks the shapes
  target = library.MATMUL_TARGETS.get(jnp.dtype(a.dtype))
  if (target is None or a.dtype != b.dtype
      or not library.runs_here(*a.shape[-2:], *b.shape[-2:])):
    return _xla_product(a, b, transpose_a, transpose_b)
  return jax.lax.platform_dependent(
      a, b,
      cpu=_cpu_product(transpose_a, transpose_b),
      default=lambda x, y: _xla_product(x, y, transpose_a, transpose_b))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _matmul(a, b, transpose_a, transpose_b):
  return _product(a, b, transpose_a, transpose_b)


def _matmul_fwd(a, b, transpose_a, transpose_b):
  # _matmul, not _product: under a second derivative this is differentiated.
  return _matmul(a, b, transpose_a, transpose_b), (a, b)


def _matmul_bwd(transpose_a, transpose_b, residuals, g):
  """With X = op(a), Y = op(b): dX = g Y^T, dY = X^T g, each in one product
  of the operands as stored (itself differentiable: higher orders work)."""
  a, b = residuals
  if transpose_a:  # da = dX^T = Y g^T
    da = _matmul(b, g, transpose_b, True)
  else:  # da = g Y^T
    da = _matmul(g, b, False, not transpose_b)
  if transpose_b:  # db = dY^T = g^T X
    db = _matmul(g, a, True, transpose_a)
  else:  # db = X^T g
    db = _matmul(a, g, not transpose_a, False)
  return da.astype(a.dtype), db.astype(b.dtype)


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def matmul(a: jax.Array, b: jax.Array, *, transpose_a: bool = False,
           transpose_b: bool = False) -> jax.Array:
  """op(a) @ op(b) over matching leading axes: [..., m, n].

  Args:
    a: [..., m, k], or [..., k, m] with transpose_a.
    b: [..., k, n], or [..., n, k] with transpose_b.
    transpose_a: contract a's second-last axis instead of its last.
    transpose_b: contract b's last axis instead of its second-last.
  """
  return _matmul(a, b, bool(transpose_a), bool(transpose_b))
