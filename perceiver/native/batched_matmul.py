"""native.matmul: op(a) @ op(b) over matching leading axes, on the CPU as
batched_matmul.cc's GEMMs, MKL's or OpenBLAS's (see __init__.py); and
native.matmul_pair: two independent products in one call, each on its share
of the threads."""

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


# Two independent products in one call ------------------------------------
#
# A linear layer's backward pass has two products of equal FLOPs (dx = g W^T
# and dW = x^T g, 2 T I O each) that do not depend on each other. As two
# `matmul` calls each is split over both threads in halves; as one pair call
# each thread computes one of them whole (batched_matmul.cc, MatmulPair):
# fewer, larger GEMMs (benchmarks/RESULTS.md, 2026-12-07, evening).


def _pair_shapes(a1, b1, a2, b2, flags):
  return (_out_shape(a1, b1, *flags[:2]), _out_shape(a2, b2, *flags[2:]))


def _pair_library_call(a1, b1, a2, b2, flags):
  """The FFI call on arrays as they are (one device's shards, or all)."""
  call = jax.ffi.ffi_call(
      library.PAIR_TARGETS[jnp.dtype(a1.dtype)],
      tuple(jax.ShapeDtypeStruct(shape, a1.dtype)
            for shape in _pair_shapes(a1, b1, a2, b2, flags)))
  ta1, tb1, ta2, tb2 = flags
  return call(a1, b1, a2, b2, transpose_a1=ta1, transpose_b1=tb1,
              transpose_a2=ta2, transpose_b2=tb2)


def _pair_mesh_split(flags, arg_shapes):
  """(mesh, (`_split`'s four for each product)) when all four operands are
  sharded over one mesh, else None."""
  first = _mesh_split(*flags[:2], arg_shapes[:2])
  second = _mesh_split(*flags[2:], arg_shapes[2:])
  if first is None or second is None or first[0] != second[0]:
    return None
  return first[0], (first[1:], second[1:])


def _pair_partition(flags, mesh, arg_shapes, result_shape):
  """As `_partition`, for each product of the pair."""
  del result_shape
  split = _pair_mesh_split(flags, arg_shapes)
  if split is None:
    whole = library.replicated(arg_shapes)
    return mesh, functools.partial(_pair_library_call, flags=flags), (
        whole, whole), (whole,) * 4
  mesh, ((a1, b1, out1, k1), (a2, b2, out2, k2)) = split

  def lower(w, x, y, z):
    c1, c2 = _pair_library_call(w, x, y, z, flags)
    return (jax.lax.psum(c1, k1) if k1 else c1,
            jax.lax.psum(c2, k2) if k2 else c2)

  named = lambda spec: NamedSharding(mesh, spec)
  return mesh, lower, (named(out1), named(out2)), tuple(
      named(spec) for spec in (a1, b1, a2, b2))


def _pair_infer_sharding(flags, mesh, arg_shapes, result_shape):
  del mesh, result_shape
  split = _pair_mesh_split(flags, arg_shapes)
  if split is None:
    return None
  mesh, ((_, _, out1, _), (_, _, out2, _)) = split
  return NamedSharding(mesh, out1), NamedSharding(mesh, out2)


def _pair_sharding_rule(flags, mesh, operand_types, result_types):
  del mesh, operand_types, result_types
  ta1, tb1, ta2, tb2 = flags
  operand = lambda t, x, y: f'{y} {x}' if t else f'{x} {y}'
  return (f'...0 {operand(ta1, "m1", "k1")}, ...0 {operand(tb1, "k1", "n1")}, '
          f'...1 {operand(ta2, "m2", "k2")}, ...1 {operand(tb2, "k2", "n2")} '
          '-> ...0 m1 n1, ...1 m2 n2'), {'reduction_factors': ('k1', 'k2')}


_partitioned_pair = custom_partitioning(_pair_library_call,
                                        static_argnums=(4,))
_partitioned_pair.def_partition(
    _pair_partition, infer_sharding_from_operands=_pair_infer_sharding,
    sharding_rule=_pair_sharding_rule)


@functools.cache
def _cpu_pair(flags):
  """The partitioned pair call for one set of flags, with its vmap rule (the
  mapped axis a leading batch axis of all four operands)."""

  @custom_batching.custom_vmap
  def pair(a1, b1, a2, b2):
    return _partitioned_pair(a1, b1, a2, b2, flags)

  @pair.def_vmap
  def pair_vmap(axis_size, in_batched, *operands):
    return pair(*library.broadcast_unmapped(axis_size, in_batched,
                                            operands)), (True, True)

  return pair


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _matmul_pair(a1, b1, a2, b2, flags):
  """(op(a1) @ op(b1), op(a2) @ op(b2)): one library call on the CPU where
  all four share a dtype it has, else each product as `_product` does."""
  _pair_shapes(a1, b1, a2, b2, flags)  # checks the shapes
  operands = (a1, b1, a2, b2)
  target = library.PAIR_TARGETS.get(jnp.dtype(a1.dtype))
  if (target is None or any(x.dtype != a1.dtype for x in operands)
      or not library.runs_here(*(d for x in operands for d in x.shape[-2:]))):
    return (_product(a1, b1, *flags[:2]), _product(a2, b2, *flags[2:]))
  return jax.lax.platform_dependent(
      *operands, cpu=_cpu_pair(flags),
      default=lambda w, x, y, z: (_xla_product(w, x, *flags[:2]),
                                  _xla_product(y, z, *flags[2:])))


def _matmul_pair_fwd(a1, b1, a2, b2, flags):
  return _matmul_pair(a1, b1, a2, b2, flags), (a1, b1, a2, b2)


def _matmul_pair_bwd(flags, residuals, gs):
  a1, b1, a2, b2 = residuals
  return (_matmul_bwd(*flags[:2], (a1, b1), gs[0])
          + _matmul_bwd(*flags[2:], (a2, b2), gs[1]))


_matmul_pair.defvjp(_matmul_pair_fwd, _matmul_pair_bwd)


def matmul_pair(a1: jax.Array, b1: jax.Array, a2: jax.Array, b2: jax.Array,
                *, transpose_a1: bool = False, transpose_b1: bool = False,
                transpose_a2: bool = False, transpose_b2: bool = False
                ) -> tuple[jax.Array, jax.Array]:
  """(matmul(a1, b1, ...), matmul(a2, b2, ...)), the flags as `matmul`'s,
  in one call: on the CPU each product gets half of XLA's threads (on two,
  one GEMM each, whole), where two `matmul` calls would split each over all
  of them. For independent products of similar size, such as a linear
  layer's dx = g W^T and dW = x^T g."""
  flags = tuple(map(bool, (transpose_a1, transpose_b1, transpose_a2,
                           transpose_b2)))
  return _matmul_pair(a1, b1, a2, b2, flags)
