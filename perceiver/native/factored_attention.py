"""native.factored_attention: attention of queries shared by the whole batch
over the keys and values of a factored byte array, on the CPU as
factored_attention.cc (perceiver/native/__init__.py).

  factored_attention(q, raw, mean, inv, pk, wk, sk, pv, wv, sv,
                     num_heads=H, scale=s) -> [B, N, H E]

  q    [N, H D]   the queries, the same for every example
  raw  [B, M, c]  the byte array's per-example channels
  mean, inv [B, M]  the inputs' LayerNorm statistics (mean, 1 / deviation)
  pk [M, H D], wk [c, H D], sk [H D]   the keys' position term, raw weights
                                       and position weights' column sums
  pv [M, H E], wv [c, H E], sv [H E]   the same for the values

attends over K_b = inv_b ((raw_b - mean_b) wk + pk - mean_b sk) and
V_b = inv_b ((raw_b - mean_b) wv + pv - mean_b sv), per head: the keys and
values of a LayerNorm'd factored byte array (perceiver/byte_array.py; with
W' = scale W, wk = W'[:c], pk = pos W'[c:], sk = the column sums of W'[c:])
without their constant terms, which the caller adds (the keys' does not
change the softmax; the values' is added to the output). The kernel computes
q pk^T once per batch and never forms K_b or V_b. `reference_forward` is the
same in jax.numpy, for other backends and dtypes, and for gradients the
kernel does not give: those of raw, mean and inv (the byte array is data in
training; a gradient through the inputs, such as a saliency map, is XLA's)
and of second order.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
from jax import custom_batching
from jax.custom_derivatives import SymbolicZero
from jax.experimental.custom_partitioning import custom_partitioning
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

from perceiver.native import fused_attention
from perceiver.native import library


class Heads(NamedTuple):
  heads: int
  scale: float

  def ffi_attributes(self):
    return dict(heads=np.int64(self.heads), scale=np.float64(self.scale))


def keys_and_values(raw, mean, inv, pk, wk, sk, pv, wv, sv):
  """(K [B, M, H D], V [B, M, H E]) without their constant terms."""
  centred = raw - mean[..., None]
  project = lambda w, p, s: inv[..., None] * (
      centred @ w + p - mean[..., None] * s)
  return project(wk, pk, sk), project(wv, pv, sv)


def reference_forward(q, raw, mean, inv, pk, wk, sk, pv, wv, sv, a: Heads):
  """(output [B, N, H E], lse [B, H, N]) in jax.numpy: attention of q over
  `keys_and_values`."""
  k, v = keys_and_values(raw, mean, inv, pk, wk, sk, pv, wv, sv)
  q = jnp.broadcast_to(q, raw.shape[:1] + q.shape)
  heads = fused_attention.Heads(a.heads, 0, 0, 0, q.shape[-1] // a.heads,
                                v.shape[-1] // a.heads, a.scale)
  return fused_attention.reference_forward(q, k, v, heads)


def _targets(*operands):
  targets = library.FACTORED_TARGETS.get(jnp.dtype(operands[0].dtype))
  q, raw = operands[:2]
  if (targets is None or any(x.dtype != q.dtype for x in operands)
      or raw.shape[1] == 0 or not library.runs_here(*raw.shape, *q.shape)):
    return None
  return targets


# Operand i's batch axis (None: shared by the batch) for each kind of call.
_FORWARD_BATCH = (None, 0, 0, 0, None, None, None, None, None, None)
_BACKWARD_BATCH = _FORWARD_BATCH + (0, 0, 0)
_FORWARD_RULE = ('n w, b m c, b m, b m, m w, c w, w, m x, c x, x '
                 '-> b n x, b h n')
_BACKWARD_RULE = ('n w, b m c, b m, b m, m w, c w, w, m x, c x, x, b n x, '
                  'b h n, b n x -> n w, m w, c w, w, m x, c x, x')


def _forward_results(q, raw, mean, inv, pk, wk, sk, pv, wv, sv, a):
  b, n = raw.shape[0], q.shape[0]
  return (jax.ShapeDtypeStruct((b, n, pv.shape[1]), q.dtype),
          jax.ShapeDtypeStruct((b, a.heads, n), q.dtype))


def _backward_results(q, raw, mean, inv, pk, wk, sk, pv, wv, sv, *_):
  return tuple(jax.ShapeDtypeStruct(x.shape, x.dtype)
               for x in (q, pk, wk, sk, pv, wv, sv))


@functools.cache
def _cpu_call(target: str, backward: bool, a: Heads):
  """One FFI target with its partitioning rule (each device its own
  examples; the backward pass's gradients, all of shared operands, summed
  over the devices that split the batch) and a vmap rule (the reference)."""
  batch_axes = _BACKWARD_BATCH if backward else _FORWARD_BATCH
  num_results = 7 if backward else 2

  def call(*operands):
    results = (_backward_results if backward else _forward_results)(
        *operands, a)
    return jax.ffi.ffi_call(target, results)(*operands,
                                             **a.ffi_attributes())

  def batch_spec(arg_shapes):
    """(mesh, the batch's mesh axes) from raw's sharding, or None."""
    if not all(isinstance(x.sharding, NamedSharding) for x in arg_shapes):
      return None
    raw = arg_shapes[1].sharding
    return raw.mesh, (tuple(raw.spec) + (None,))[0]

  def shardings(mesh, batch, arg_shapes):
    def spec(x, axis):
      entries = [None] * x.ndim
      if axis is not None:
        entries[axis] = batch
      return NamedSharding(mesh, P(*entries))
    args = tuple(spec(x, axis) for x, axis in zip(arg_shapes, batch_axes))
    if backward:  # gradients of shared operands: summed, not split
      out = tuple(spec(x, None) for x in _backward_results(*arg_shapes))
    else:
      out = tuple(spec(x, 0) for x in _forward_results(*arg_shapes[:10], a))
    return out, args

  def infer(mesh, arg_shapes, result_shape):
    del mesh, result_shape
    found = batch_spec(arg_shapes)
    return None if found is None else shardings(*found, arg_shapes)[0]

  def partition(mesh, arg_shapes, result_shape):
    del result_shape
    found = batch_spec(arg_shapes)
    if found is None:  # HLO shardings: every device computes the whole
      whole = library.replicated(arg_shapes)
      return (mesh, call, (whole,) * num_results, (whole,) * len(arg_shapes))
    mesh, batch = found
    out, args = shardings(mesh, batch, arg_shapes)

    def lower(*operands):
      results = call(*operands)
      if backward and batch is not None:
        results = tuple(jax.lax.psum(x, batch) for x in results)
      return results

    return mesh, lower, out, args

  partitioned = custom_partitioning(call)
  partitioned.def_partition(
      partition, infer_sharding_from_operands=infer,
      sharding_rule=_BACKWARD_RULE if backward else _FORWARD_RULE)

  @custom_batching.custom_vmap
  def batched(*operands):
    return partitioned(*operands)

  @batched.def_vmap
  def batched_vmap(axis_size, in_batched, *operands):
    operands = library.broadcast_unmapped(axis_size, in_batched, operands)
    if backward:
      reference = functools.partial(_reference_backward, a=a)
    else:
      reference = functools.partial(reference_forward, a=a)
    out = jax.vmap(reference)(*operands)
    return out, jax.tree.map(lambda _: True, out)

  return batched


def _reference_backward(q, raw, mean, inv, pk, wk, sk, pv, wv, sv, out, lse,
                        g, a: Heads):
  """The kernel's backward outputs (the gradients of q, pk, wk, sk, pv, wv,
  sv) from jax.vjp of the reference."""
  del out, lse
  f = lambda q, pk, wk, sk, pv, wv, sv: reference_forward(
      q, raw, mean, inv, pk, wk, sk, pv, wv, sv, a)[0]
  return jax.vjp(f, q, pk, wk, sk, pv, wv, sv)[1](g)


@functools.partial(jax.custom_vjp, nondiff_argnums=(10,))
def _forward(q, raw, mean, inv, pk, wk, sk, pv, wv, sv, a: Heads):
  """(output, lse): the library on the CPU, XLA elsewhere; its own gradient
  (second order) is reference_forward's."""
  operands = (q, raw, mean, inv, pk, wk, sk, pv, wv, sv)
  targets = _targets(*operands)
  if targets is None:
    return reference_forward(*operands, a)
  return jax.lax.platform_dependent(
      *operands, cpu=_cpu_call(targets['forward'], False, a),
      default=functools.partial(reference_forward, a=a))


def _forward_fwd(*args):
  return _forward(*args), args[:-1]


def _forward_bwd(a, operands, cotangents):
  return jax.vjp(functools.partial(reference_forward, a=a),
                 *operands)[1](cotangents)


_forward.defvjp(_forward_fwd, _forward_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(13,))
def _backward(q, raw, mean, inv, pk, wk, sk, pv, wv, sv, out, lse, g,
              a: Heads):
  """The kernel's gradients (of q, pk, wk, sk, pv, wv, sv): the library on
  the CPU, XLA elsewhere; their own gradient is the reference's."""
  operands = (q, raw, mean, inv, pk, wk, sk, pv, wv, sv, out, lse, g)
  targets = _targets(*operands[:10])
  reference = functools.partial(_reference_backward, a=a)
  if targets is None:
    return reference(*operands)
  return jax.lax.platform_dependent(
      *operands, cpu=_cpu_call(targets['backward'], True, a),
      default=reference)


def _backward_fwd(*args):
  return _backward(*args), args[:-1]


def _backward_bwd(a, operands, cotangents):
  return jax.vjp(functools.partial(_reference_backward, a=a),
                 *operands)[1](cotangents)


_backward.defvjp(_backward_fwd, _backward_bwd)


_DATA = (1, 2, 3)  # raw, mean, inv


@functools.partial(jax.custom_vjp, nondiff_argnums=(10,))
def _factored_attention(q, raw, mean, inv, pk, wk, sk, pv, wv, sv, a: Heads):
  return _forward(q, raw, mean, inv, pk, wk, sk, pv, wv, sv, a)[0]


def _factored_attention_fwd(*args):
  *primals, a = args
  values = tuple(p.value for p in primals)
  if any(primals[i].perturbed for i in _DATA):  # XLA's gradient, whole
    return reference_forward(*values, a)[0], (values, None)
  out, lse = _forward(*values, a)
  return out, (values, (out, lse))


def _factored_attention_bwd(a, residuals, g):
  values, saved = residuals
  if isinstance(g, SymbolicZero):
    g = jnp.zeros(g.shape, g.dtype)
  if saved is None:
    f = lambda *x: reference_forward(*x, a)[0]
    return jax.vjp(f, *values)[1](g)
  dq, dpk, dwk, dsk, dpv, dwv, dsv = _backward(*values, *saved, g, a)
  zero = lambda x: jnp.zeros_like(x)
  q, raw, mean, inv = values[:4]
  return (dq, zero(raw), zero(mean), zero(inv), dpk, dwk, dsk, dpv, dwv, dsv)


_factored_attention.defvjp(_factored_attention_fwd, _factored_attention_bwd,
                           symbolic_zeros=True)


def factored_attention(q, raw, mean, inv, pk, wk, sk, pv, wv, sv, *,
                       num_heads: int = 1, scale: float = 1.0) -> jax.Array:
  """Attention of q (shared by the batch) over the factored keys and values
  (module docstring); [B, N, H E], without the values' constant term."""
  n, wd = q.shape if q.ndim == 2 else (None, None)
  b, m, c = raw.shape if raw.ndim == 3 else (None, None, None)
  shapes_fit = (
      n is not None and b is not None and mean.shape == inv.shape == (b, m)
      and pk.shape == (m, wd) and wk.shape == (c, wd) and sk.shape == (wd,)
      and pv.ndim == 2 and pv.shape[0] == m
      and wv.shape == (c, pv.shape[1]) and sv.shape == (pv.shape[1],))
  if not shapes_fit:
    raise ValueError(
        'factored_attention: needs q [N, H D], raw [B, M, c], mean and inv '
        '[B, M], pk [M, H D], wk [c, H D], sk [H D], pv [M, H E], '
        f'wv [c, H E], sv [H E]; got q {q.shape}, raw {raw.shape}, mean '
        f'{mean.shape}, inv {inv.shape}, pk {pk.shape}, wk {wk.shape}, sk '
        f'{sk.shape}, pv {pv.shape}, wv {wv.shape}, sv {sv.shape}.')
  if num_heads <= 0 or wd % num_heads or pv.shape[1] % num_heads:
    raise ValueError(f'factored_attention: widths {wd} and {pv.shape[1]} do '
                     f'not split into num_heads={num_heads} heads.')
  return _factored_attention(q, raw, mean, inv, pk, wk, sk, pv, wv, sv,
                             Heads(num_heads, float(scale)))
