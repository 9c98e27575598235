"""native.attention and native.self_attention: multi-head softmax attention
over token-major arrays, on the CPU as fused_attention.cc
(perceiver/native/__init__.py).

  attention(q, k, v, num_heads=H, scale=s)
      q [B, N, H Dq], k [B, M, H Dq], v [B, M, H Dv] -> [B, N, H Dv]
  self_attention(qkv, num_heads=H, qk_width=H Dq, scale=s)
      qkv [B, N, 2 H Dq + H Dv] (q, k and v side by side) -> [B, N, H Dv]

Head h is the h-th block of Dq (Dv) columns: the layout of a linear layer's
output, read in place, so no head is copied out and, for self_attention, the
gradient comes back in qkv's own layout. The forward pass also gives each
query row's log-sum-exp of its scaled logits (lse [B, H, N]); the backward
pass recomputes the probabilities from q, k and lse.

`reference_output`, `reference_forward` and `reference_backward` are the same
computations in jax.numpy: XLA runs them off the CPU and for other dtypes,
the FLOP count on the jaxpr (experiments/tools/flops.py) reads the first, and
a gradient of the backward pass (second order) is theirs.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import custom_batching
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

from perceiver.native import library


class Heads(NamedTuple):
  """Where the heads lie in q's, k's and v's rows (static, hashable)."""
  heads: int
  q_offset: int
  k_offset: int
  v_offset: int
  qk_dim: int  # Dq
  v_dim: int  # Dv
  scale: float

  def ffi_attributes(self):
    return dict(heads=np.int64(self.heads), q_offset=np.int64(self.q_offset),
                k_offset=np.int64(self.k_offset),
                v_offset=np.int64(self.v_offset),
                qk_dim=np.int64(self.qk_dim), v_dim=np.int64(self.v_dim),
                scale=np.float64(self.scale))


def _wide(dtype):
  """The softmax's dtype: float32 or wider."""
  return jnp.promote_types(dtype, jnp.float32)


def _split(x, offset: int, heads: int, dim: int):
  """[B, T, W] -> the heads [B, H, T, dim] at column `offset`."""
  b, t, _ = x.shape
  x = x[:, :, offset:offset + heads * dim].reshape(b, t, heads, dim)
  return x.transpose(0, 2, 1, 3)


def _merge(x):
  """[B, H, T, dim] -> [B, T, H dim]."""
  b, h, t, d = x.shape
  return x.transpose(0, 2, 1, 3).reshape(b, t, h * d)


def _heads(q, k, v, a: Heads):
  qh = _split(q, a.q_offset, a.heads, a.qk_dim)
  kh = _split(k, a.k_offset, a.heads, a.qk_dim)
  vh = _split(v, a.v_offset, a.heads, a.v_dim)
  return qh, kh, vh


def reference_output(q, k, v, a: Heads):
  """(output [B, N, H Dv], row maximum and sum of exp [B, H, N, 1]): the
  softmax in float32 or wider, normalised after the product with v."""
  qh, kh, vh = _heads(q, k, v, a)
  qh = qh * jnp.asarray(a.scale, qh.dtype)
  logits = jnp.einsum('bhnd,bhmd->bhnm', qh, kh)
  logits = logits.astype(_wide(logits.dtype))
  row_max = logits.max(axis=-1, keepdims=True)
  exp = jnp.exp(logits - row_max)  # [B, H, N, M]
  total = exp.sum(axis=-1, keepdims=True)  # [B, H, N, 1]
  unnormalised = exp.astype(v.dtype)
  out = (jnp.einsum('bhnm,bhme->bhne', unnormalised, vh) / total).astype(
      v.dtype)
  return _merge(out), row_max, total


def reference_forward(q, k, v, a: Heads):
  """(output [B, N, H Dv], lse [B, H, N]) in jax.numpy."""
  out, row_max, total = reference_output(q, k, v, a)
  return out, (row_max + jnp.log(total))[..., 0]


def _reference_head_gradients(q, k, v, out, lse, g, a: Heads):
  """(dq, dk, dv) per head, [B, H, T, dim] each."""
  qh, kh, vh = _heads(q, k, v, a)
  oh = _split(out, 0, a.heads, a.v_dim)
  gh = _split(g, 0, a.heads, a.v_dim)
  wide = _wide(q.dtype)
  scale = jnp.asarray(a.scale, wide)
  logits = jnp.einsum('bhnd,bhmd->bhnm', qh, kh).astype(wide) * scale
  p = jnp.exp(logits - lse[..., None].astype(wide))  # the probabilities
  d_v = jnp.einsum('bhnm,bhne->bhme', p.astype(v.dtype), gh)  # P^T dO
  d_p = jnp.einsum('bhne,bhme->bhnm', gh, vh).astype(wide)  # dO V^T
  delta = jnp.sum(gh.astype(wide) * oh.astype(wide), axis=-1, keepdims=True)
  d_s = (p * (d_p - delta) * scale).astype(q.dtype)
  d_q = jnp.einsum('bhnm,bhmd->bhnd', d_s, kh)
  d_k = jnp.einsum('bhnm,bhnd->bhmd', d_s, qh)
  return d_q.astype(q.dtype), d_k.astype(k.dtype), d_v.astype(v.dtype)


def _place(x, rows_like, offset):
  """Heads [B, H, T, dim] as the columns at `offset` of an array shaped like
  `rows_like` (zero elsewhere)."""
  merged = _merge(x)
  if merged.shape == rows_like.shape:
    return merged
  width = rows_like.shape[-1]
  return jnp.pad(merged, ((0, 0), (0, 0),
                          (offset, width - offset - merged.shape[-1])))


def reference_backward(q, k, v, out, lse, g, a: Heads):
  """(dq, dk, dv) of attention at q, k, v for the output's cotangent g, in
  q's, k's and v's layouts, from the forward pass's output and lse."""
  d_q, d_k, d_v = _reference_head_gradients(q, k, v, out, lse, g, a)
  return (_place(d_q, q, a.q_offset), _place(d_k, k, a.k_offset),
          _place(d_v, v, a.v_offset))


def reference_backward_packed(qkv, out, lse, g, a: Heads):
  """d qkv for self_attention: dq, dk and dv side by side."""
  d_q, d_k, d_v = _reference_head_gradients(qkv, qkv, qkv, out, lse, g, a)
  return jnp.concatenate([_merge(d_q), _merge(d_k), _merge(d_v)], axis=-1)


def _targets(q, k, v):
  """{'forward', 'backward', 'packed'} FFI targets, or None for XLA."""
  targets = library.ATTENTION_TARGETS.get(jnp.dtype(q.dtype))
  if (targets is None or not q.dtype == k.dtype == v.dtype
      or k.shape[1] == 0 or q.shape[1] == 0
      or not library.runs_here(*q.shape[1:], *k.shape[1:], *v.shape[1:])):
    return None
  return targets


def _forward_results(q, k, v, a: Heads):
  b, n = q.shape[:2]
  return (jax.ShapeDtypeStruct((b, n, a.heads * a.v_dim), q.dtype),
          jax.ShapeDtypeStruct((b, a.heads, n), q.dtype))


def _backward_results(*operands, packed: bool):
  if packed:  # qkv, out, lse, g -> d qkv
    return jax.ShapeDtypeStruct(operands[0].shape, operands[0].dtype)
  return tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in operands[:3])


# Shardy rules: the batch axis b may be split over devices, nothing else.
_RULES = {
    'forward': 'b n w, b m x, b m y -> b n z, b h n',
    'backward': ('b n w, b m x, b m y, b n z, b h n, b n z '
                 '-> b n w, b m x, b m y'),
    'packed': 'b n w, b n z, b h n, b n z -> b n w',
}


@functools.cache
def _cpu_call(target: str, kind: str, a: Heads):
  """One FFI target with its partitioning and vmap rules: each device
  computes its own batch elements (the other axes are never split); a
  vmapped axis is folded into the batch axis."""

  def call(*operands):
    if kind == 'forward':
      results = _forward_results(*operands, a)
    else:
      results = _backward_results(*operands, packed=kind == 'packed')
    return jax.ffi.ffi_call(target, results)(*operands,
                                             **a.ffi_attributes())

  num_results = {'forward': 2, 'backward': 3, 'packed': 1}[kind]

  def shardings(arg_shapes, result_shapes):
    """(result shardings, operand shardings): the first operand's batch
    split everywhere; None when the operands are not over a mesh."""
    if not all(isinstance(x.sharding, NamedSharding) for x in arg_shapes):
      return None
    first = arg_shapes[0].sharding
    batch = (tuple(first.spec) + (None,))[0]
    spec = lambda x: NamedSharding(first.mesh,
                                   P(batch, *(None,) * (x.ndim - 1)))
    results = jax.tree.leaves(result_shapes)
    out = tuple(spec(x) for x in results)
    return (out if num_results > 1 else out[0]), tuple(
        spec(x) for x in arg_shapes)

  partitioned = library.partitioned(call, shardings, _RULES[kind],
                                    num_results)

  @custom_batching.custom_vmap
  def batched(*operands):
    return partitioned(*operands)

  @batched.def_vmap
  def batched_vmap(axis_size, in_batched, *operands):
    fold = lambda x: x.reshape((-1,) + x.shape[2:])
    operands = [fold(x) for x in library.broadcast_unmapped(
        axis_size, in_batched, operands)]
    unfold = lambda x: x.reshape((axis_size, -1) + x.shape[1:])
    out = jax.tree.map(unfold, batched(*operands))
    return out, jax.tree.map(lambda _: True, out)

  return batched


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _forward(q, k, v, a: Heads):
  """(output, lse): the library on the CPU, XLA elsewhere; its own gradient
  (second order) is reference_forward's."""
  targets = _targets(q, k, v)
  if targets is None:
    return reference_forward(q, k, v, a)
  return jax.lax.platform_dependent(
      q, k, v, cpu=_cpu_call(targets['forward'], 'forward', a),
      default=functools.partial(reference_forward, a=a))


def _forward_fwd(q, k, v, a):
  return _forward(q, k, v, a), (q, k, v)


def _forward_bwd(a, args, cotangents):
  return jax.vjp(functools.partial(reference_forward, a=a),
                 *args)[1](cotangents)


_forward.defvjp(_forward_fwd, _forward_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _backward(q, k, v, out, lse, g, a: Heads):
  """(dq, dk, dv): the library on the CPU, XLA elsewhere; its own gradient
  is reference_backward's."""
  targets = _targets(q, k, v)
  reference = functools.partial(reference_backward, a=a)
  if targets is None:
    return reference(q, k, v, out, lse, g)
  return jax.lax.platform_dependent(
      q, k, v, out, lse, g, cpu=_cpu_call(targets['backward'], 'backward', a),
      default=reference)


def _backward_fwd(q, k, v, out, lse, g, a):
  return _backward(q, k, v, out, lse, g, a), (q, k, v, out, lse, g)


def _backward_bwd(a, args, cotangents):
  return jax.vjp(functools.partial(reference_backward, a=a),
                 *args)[1](cotangents)


_backward.defvjp(_backward_fwd, _backward_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _backward_packed(qkv, out, lse, g, a: Heads):
  """d qkv for self_attention: the library on the CPU, XLA elsewhere."""
  targets = _targets(qkv, qkv, qkv)
  reference = functools.partial(reference_backward_packed, a=a)
  if targets is None:
    return reference(qkv, out, lse, g)
  return jax.lax.platform_dependent(
      qkv, out, lse, g, cpu=_cpu_call(targets['packed'], 'packed', a),
      default=reference)


def _backward_packed_fwd(qkv, out, lse, g, a):
  return _backward_packed(qkv, out, lse, g, a), (qkv, out, lse, g)


def _backward_packed_bwd(a, args, cotangent):
  return jax.vjp(functools.partial(reference_backward_packed, a=a),
                 *args)[1](cotangent)


_backward_packed.defvjp(_backward_packed_fwd, _backward_packed_bwd)


def _output(q, k, v, a: Heads):
  """What runs without differentiation, and what the jaxpr FLOP count reads
  (the larger branch: reference_output's)."""
  targets = _targets(q, k, v)
  if targets is None:
    return reference_output(q, k, v, a)[0]
  call = _cpu_call(targets['forward'], 'forward', a)
  return jax.lax.platform_dependent(
      q, k, v, cpu=lambda *x: call(*x)[0],
      default=lambda *x: reference_output(*x, a)[0])


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _attention(q, k, v, a: Heads):
  return _output(q, k, v, a)


def _attention_fwd(q, k, v, a):
  out, lse = _forward(q, k, v, a)
  return out, (q, k, v, out, lse)


def _attention_bwd(a, residuals, g):
  return _backward(*residuals, g, a)


_attention.defvjp(_attention_fwd, _attention_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _self_attention(qkv, a: Heads):
  return _output(qkv, qkv, qkv, a)


def _self_attention_fwd(qkv, a):
  out, lse = _forward(qkv, qkv, qkv, a)
  return out, (qkv, out, lse)


def _self_attention_bwd(a, residuals, g):
  return (_backward_packed(*residuals, g, a),)


_self_attention.defvjp(_self_attention_fwd, _self_attention_bwd)


def _check_rank(**arrays):
  for name, x in arrays.items():
    if x.ndim != 3:
      raise ValueError(f'attention: {name} must be [B, T, W]; got shape '
                       f'{x.shape}.')


def _check_heads(name, width, num_heads):
  if num_heads <= 0 or width % num_heads:
    raise ValueError(f'attention: {name} width {width} does not split into '
                     f'num_heads={num_heads} heads.')


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
              num_heads: int = 1, scale: float = 1.0) -> jax.Array:
  """softmax(scale q k^T) v per head, the softmax in float32 or wider.

  Args:
    q: [B, N, H Dq] queries (head h: columns h Dq .. (h + 1) Dq).
    k: [B, M, H Dq] keys.
    v: [B, M, H Dv] values.
    num_heads: H.
    scale: multiplies the logits (1 / sqrt(Dq) for the usual attention).

  Returns:
    [B, N, H Dv] in v's dtype. Its gradient keeps q, k, v, the output and one
    log-sum-exp per query row and head (nothing of size N x M).
  """
  _check_rank(q=q, k=k, v=v)
  _check_heads('q/k', q.shape[-1], num_heads)
  _check_heads('v', v.shape[-1], num_heads)
  if (k.shape[:2] != v.shape[:2] or q.shape[0] != k.shape[0]
      or q.shape[-1] != k.shape[-1]):
    raise ValueError(
        f'attention: needs q [B, N, H Dq], k [B, M, H Dq], v [B, M, H Dv]; '
        f'got q {q.shape}, k {k.shape}, v {v.shape}.')
  a = Heads(num_heads, 0, 0, 0, q.shape[-1] // num_heads,
            v.shape[-1] // num_heads, float(scale))
  return _attention(q, k, v, a)


def self_attention(qkv: jax.Array, *, num_heads: int, qk_width: int,
                   scale: float = 1.0) -> jax.Array:
  """attention(q, k, v) for q, k, v side by side in one array.

  Args:
    qkv: [B, N, 2 qk_width + v_width]: q, k and v's columns, in that order
      (a fused projection's output).
    num_heads: H.
    qk_width: H Dq, the width of q and of k.
    scale: multiplies the logits.

  Returns:
    [B, N, v_width]; the gradient is d qkv in qkv's layout.
  """
  _check_rank(qkv=qkv)
  v_width = qkv.shape[-1] - 2 * qk_width
  if qk_width <= 0 or v_width <= 0:
    raise ValueError(f'self_attention: qkv width {qkv.shape[-1]} does not '
                     f'hold q and k of width {qk_width} and some v.')
  _check_heads('q/k', qk_width, num_heads)
  _check_heads('v', v_width, num_heads)
  a = Heads(num_heads, 0, qk_width, 2 * qk_width, qk_width // num_heads,
            v_width // num_heads, float(scale))
  return _self_attention(qkv, a)
