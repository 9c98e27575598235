"""Model summary: parameters, FLOPs per example and their split by module.

FLOPs count a multiply and an add as two operations and every application of
shared weights, as the paper does (experiments/tools/flops.py), on the
model's plain Haiku path (`modeling.build_counting_model`); `xla=True` adds
XLA's cost analysis of the compiled forward pass, lower for shared
cross-attends, whose identical keys and values XLA computes once.
"""

from __future__ import annotations

import collections

from experiments.tools import flops as flops_lib
from experiments import modeling


def _group(path: str, depth: int) -> str:
  return '/'.join(path.replace('~/', '').split('/')[:depth]) or '(top)'


def _plain(shape):
  """A config's input_shape as a JSON-ready list (or dict of lists)."""
  if hasattr(shape, 'items'):
    return {k: list(v) for k, v in shape.items()}
  return list(shape)


def summarize(config, *, depth: int = 2, xla: bool = False) -> dict:
  """Parameter count, FLOPs per example and their split by module."""
  params, state = modeling.variable_shapes(config)
  model = modeling.build_counting_model(config)
  forward = lambda p, s, x: model.apply(p, s, None, x, is_training=False)[0]
  inputs = modeling.example_inputs(config, batch_size=1)
  total_flops, per_module_flops = flops_lib.count_flops(
      forward, params, state, inputs)

  modules = collections.defaultdict(lambda: {'params': 0, 'flops': 0})
  for path, leaves in params.items():
    modules[_group(path, depth)]['params'] += modeling.count_params(leaves)
  for path, count in per_module_flops.items():
    modules[_group(path, depth)]['flops'] += count
  result = {
      'model': config.model_name,
      'input': config.input_name,
      'input_shape': _plain(config.input_shape),
      'params': modeling.count_params(params),
      'flops': total_flops,
      'modules': dict(sorted(modules.items())),
  }
  if xla:
    result['xla_flops'] = flops_lib.xla_flops(forward, params, state, inputs)
  return result


def format_summary(s: dict) -> str:
  lines = [f"model {s['model']} on {s['input']} input {s['input_shape']}",
           f"parameters        {s['params']:>16,d}  ({s['params'] / 1e6:.2f}M)",
           f"FLOPs / example   {s['flops']:>16,d}  ({s['flops'] / 1e9:.1f} G)"]
  if 'xla_flops' in s:
    lines.append(f"XLA FLOPs / ex.   {int(s['xla_flops']):>16,d}  "
                 f"({s['xla_flops'] / 1e9:.1f} G, after XLA's CSE)")
  width = max(len(k) for k in s['modules'])
  lines.append('')
  lines.append(f"{'module':<{width}}  {'params':>12}  {'GFLOPs':>10}")
  for name, m in s['modules'].items():
    lines.append(f"{name:<{width}}  {m['params']:>12,d}  {m['flops'] / 1e9:>10.4g}")
  return '\n'.join(lines)
