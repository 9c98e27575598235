"""FLOP counts of a traced function, per Haiku module, as the paper counts them.

The paper counts a multiply and an add as two operations and counts every
module application, including repeated applications of shared weights. XLA's
`cost_analysis()` of the compiled function counts what actually runs after
common-subexpression elimination: in the Perceiver, the shared cross-attends
2..R see the same inputs with the same weights, so XLA computes their keys and
values once. `count_flops` therefore counts on the jaxpr (before any XLA
optimisation): dot products and convolutions as 2 x multiply-adds, elementwise
and reduction ops as one operation per element. On models without repeated
identical work the two counts agree (tests/flops_test.py checks this).
"""

from __future__ import annotations

import collections
import math
from typing import Any, Callable

import jax
import jax.extend as jex

from perceiver import native

_ELEMENTWISE = frozenset({
    'add', 'sub', 'mul', 'div', 'neg', 'max', 'min', 'exp', 'exp2', 'log',
    'log1p', 'tanh', 'logistic', 'erf', 'sqrt', 'rsqrt', 'pow', 'integer_pow',
    'sin', 'cos', 'abs', 'square', 'erf_inv', 'expm1', 'sign', 'select_n',
    'add_any', 'atan2', 'cbrt', 'reduce_precision'})
_REDUCTIONS = frozenset({'reduce_sum', 'reduce_max', 'reduce_min',
                         'argmax', 'argmin', 'cumsum', 'cumlogsumexp'})


def _size(aval) -> int:
  return math.prod(getattr(aval, 'shape', ()))


def _eqn_flops(eqn) -> int:
  name = eqn.primitive.name
  if name == 'dot_general':
    (lhs_contract, _), _ = eqn.params['dimension_numbers']
    lhs = eqn.invars[0].aval.shape
    k = math.prod(lhs[d] for d in lhs_contract)
    return 2 * _size(eqn.outvars[0].aval) * k
  if name == 'conv_general_dilated':
    rhs = eqn.invars[1].aval.shape
    dn = eqn.params['dimension_numbers']
    out_feature_dim = dn.rhs_spec[0]
    per_output = math.prod(rhs) // rhs[out_feature_dim]
    return 2 * _size(eqn.outvars[0].aval) * per_output
  if name in _ELEMENTWISE:
    return _size(eqn.outvars[0].aval)
  if name in _REDUCTIONS:
    return _size(eqn.invars[0].aval)
  return 0


def _sub_jaxprs(eqn):
  """(jaxpr, multiplier) pairs of the calls and loops inside an equation."""
  params = eqn.params
  if eqn.primitive.name == 'scan':
    return [(params['jaxpr'], params['length'])]
  if eqn.primitive.name == 'cond':
    return [(max(params['branches'], key=lambda j: count_jaxpr(j)[0]), 1)]
  found = []
  for key in ('jaxpr', 'call_jaxpr', 'fun_jaxpr'):
    if key in params and params[key] is not None:
      found.append((params[key], 1))
  return found


def _module_path(eqn) -> str:
  """'perceiver/cross_attend_first/key' from the eqn's name stack, einsum
  specs dropped."""
  parts = str(eqn.source_info.name_stack).split('/')
  return '/'.join(p for p in parts if p and ',' not in p and '->' not in p)


def count_jaxpr(jaxpr, prefix: str = '') -> tuple[int, dict[str, int]]:
  """Total FLOPs of a (closed) jaxpr and their split by module path."""
  if isinstance(jaxpr, jex.core.ClosedJaxpr):
    jaxpr = jaxpr.jaxpr
  per_module = collections.Counter()
  total = 0
  for eqn in jaxpr.eqns:
    path = '/'.join(p for p in (prefix, _module_path(eqn)) if p)
    subs = _sub_jaxprs(eqn)
    if subs:
      for sub, times in subs:
        sub_total, sub_modules = count_jaxpr(sub, path)
        total += times * sub_total
        for k, v in sub_modules.items():
          per_module[k] += times * v
    else:
      flops = _eqn_flops(eqn)
      total += flops
      if flops:
        per_module[path or '(top)'] += flops
  return total, dict(per_module)


def count_flops(fn: Callable[..., Any], *args, **kwargs
                ) -> tuple[int, dict[str, int]]:
  """FLOPs of `fn(*args, **kwargs)` counted on its jaxpr, and per module.

  Args may be arrays or jax.ShapeDtypeStruct; nothing is computed.
  """
  jaxpr = jax.make_jaxpr(fn)(*args, **kwargs)
  return count_jaxpr(jaxpr)


def compiled_flops(compiled) -> float:
  """FLOPs of a compiled function: XLA's cost analysis plus the products
  computed in perceiver.native's custom calls, which it does not see."""
  return (float(compiled.cost_analysis()['flops'])
          + native.hlo_flops(compiled.as_text()))


def xla_flops(fn: Callable[..., Any], *args, **kwargs) -> float:
  """FLOPs of the compiled `fn` by XLA's cost analysis (after its CSE),
  perceiver.native's products included."""
  return compiled_flops(jax.jit(fn).lower(*args, **kwargs).compile())
