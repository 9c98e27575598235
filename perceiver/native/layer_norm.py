"""native.normalize and native.normalize_gradient: LayerNorm's normalisation
over the last axis, on the CPU as layer_norm.cc (perceiver/native/__init__.py).

  x_hat, inv = normalize(x, eps)           # x [..., D] -> [..., D], [..., 1]
  dx = normalize_gradient(x_hat, inv, g)   # g = d x-hat [..., D] -> [..., D]

x-hat = (x - mean) inv with inv = 1 / sqrt(var + eps), the mean and the
(biased) variance over the last axis: hk.LayerNorm before its scale and
offset, which perceiver/cpu_kernels.py folds into the linear layer that
follows. normalize_gradient is the gradient of x through x-hat given that of
x-hat, inv (g - mean(g) - x-hat mean(g x-hat)), from x-hat and inv alone.

`reference_normalize` and `reference_normalize_gradient` are the same in
jax.numpy: XLA runs them off the CPU, for other dtypes and for arrays of
fewer than two axes, and a gradient of either function (normalize's is
autodiff's, so these compose to any order) is theirs.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import custom_batching
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

from perceiver.native import library


def reference_normalize(x, eps: float):
  """(x-hat [..., D], inv [..., 1]) in jax.numpy."""
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
  inv = jax.lax.rsqrt(var + eps)
  return (x - mean) * inv, inv


def reference_normalize_gradient(x_hat, inv, g):
  """dx of LayerNorm from the gradient g of x-hat, in jax.numpy."""
  return inv * (g - jnp.mean(g, axis=-1, keepdims=True)
                - x_hat * jnp.mean(g * x_hat, axis=-1, keepdims=True))


def _targets(x):
  """{'forward', 'backward'} FFI targets for x, or None for XLA."""
  targets = library.LAYER_NORM_TARGETS.get(jnp.dtype(x.dtype))
  if (targets is None or x.ndim < 2
      or not library.runs_here(x.shape[-1], x.size // max(x.shape[-1], 1))):
    return None
  return targets


@functools.cache
def _cpu_call(target: str, kind: str, rank: int, eps: float | None):
  """One FFI target for operands of `rank` axes, with its partitioning and
  vmap rules: each device normalises its own rows (any leading axis may be
  split over devices, the last never is); a vmapped axis is one more
  leading axis. inv crosses the FFI as [...] and is [..., 1] outside it."""

  def call(*operands):
    x = operands[0]
    if kind == 'forward':
      results = (jax.ShapeDtypeStruct(x.shape, x.dtype),
                 jax.ShapeDtypeStruct(x.shape[:-1], x.dtype))
      x_hat, inv = jax.ffi.ffi_call(target, results)(x, eps=np.float64(eps))
      return x_hat, inv[..., None]
    x_hat, inv, g = operands
    return jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(x.shape, x.dtype))(
        x_hat, inv[..., 0], g)

  lead = ' '.join(f'a{i}' for i in range(rank - 1))
  rule = (f'{lead} d -> {lead} d, {lead} o' if kind == 'forward' else
          f'{lead} d, {lead} o, {lead} d -> {lead} d')

  def shardings(arg_shapes, result_shapes):
    """(result shardings, operand shardings): the first operand's leading
    axes as they are split, its last axis whole; None when the operands are
    not over a mesh."""
    if not all(isinstance(x.sharding, NamedSharding) for x in arg_shapes):
      return None
    first = arg_shapes[0].sharding
    leading = (tuple(first.spec) + (None,) * rank)[:rank - 1]
    named = NamedSharding(first.mesh, P(*leading, None))
    results = jax.tree.leaves(result_shapes)
    out = tuple(named for _ in results)
    return (out if len(out) > 1 else out[0]), tuple(named for _ in arg_shapes)

  partitioned = library.partitioned(call, shardings, rule,
                                    2 if kind == 'forward' else 1)

  @custom_batching.custom_vmap
  def batched(*operands):
    return partitioned(*operands)

  @batched.def_vmap
  def batched_vmap(axis_size, in_batched, *operands):
    operands = library.broadcast_unmapped(axis_size, in_batched, operands)
    out = _cpu_call(target, kind, rank + 1, eps)(*operands)
    return out, jax.tree.map(lambda _: True, out)

  return batched


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _normalize(x, eps: float):
  targets = _targets(x)
  reference = functools.partial(reference_normalize, eps=eps)
  if targets is None:
    return reference(x)
  return jax.lax.platform_dependent(
      x, cpu=_cpu_call(targets['forward'], 'forward', x.ndim, eps),
      default=reference)


def _normalize_fwd(x, eps):
  return _normalize(x, eps), x


def _normalize_bwd(eps, x, cotangents):
  return jax.vjp(functools.partial(reference_normalize, eps=eps),
                 x)[1](cotangents)


_normalize.defvjp(_normalize_fwd, _normalize_bwd)


@jax.custom_vjp
def _normalize_gradient(x_hat, inv, g):
  targets = _targets(x_hat)
  if targets is None or not x_hat.dtype == inv.dtype == g.dtype:
    return reference_normalize_gradient(x_hat, inv, g)
  return jax.lax.platform_dependent(
      x_hat, inv, g,
      cpu=_cpu_call(targets['backward'], 'backward', x_hat.ndim, None),
      default=reference_normalize_gradient)


def _normalize_gradient_fwd(x_hat, inv, g):
  return _normalize_gradient(x_hat, inv, g), (x_hat, inv, g)


def _normalize_gradient_bwd(args, cotangents):
  return jax.vjp(reference_normalize_gradient, *args)[1](cotangents)


_normalize_gradient.defvjp(_normalize_gradient_fwd, _normalize_gradient_bwd)


def normalize(x: jax.Array, eps: float) -> tuple[jax.Array, jax.Array]:
  """(x-hat [..., D], inv [..., 1]): x normalised over its last axis."""
  return _normalize(x, float(eps))


def normalize_gradient(x_hat: jax.Array, inv: jax.Array,
                       g: jax.Array) -> jax.Array:
  """The gradient of x given g, that of x-hat = normalize(x)[0]."""
  if x_hat.shape != g.shape or inv.shape != x_hat.shape[:-1] + (1,):
    raise ValueError(
        f'normalize_gradient: x-hat and g must be [..., D] and inv [..., 1]; '
        f'got {x_hat.shape}, {inv.shape}, {g.shape}.')
  return _normalize_gradient(x_hat, inv, g)
