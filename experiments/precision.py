"""Mixed precision for the Perceiver: bf16 compute, fp32 parameters.

`config.mixed_precision` names a policy (None: everything float32):

  'bf16'  params=float32, compute=bfloat16, output=float32

The policy is a jmp policy applied with Haiku's `hk.mixed_precision` to the
Perceiver module class, and only while the model's forward runs
(`policy_scope`), so it never leaks into other models built in the same
process. Under it every parameter of the Perceiver and its sub-modules is
created in float32 (so gradients, optimizer state and updates stay float32),
cast to bfloat16 when read, the byte array and latents are cast to bfloat16 on
entry, and the logits come out float32. The preprocessors (position features)
run outside the policy, in float32; the attention softmax is computed in
float32 inside perceiver/attention.py whatever the compute dtype. bf16 has
float32's exponent range, so no loss scaling is needed.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import haiku as hk
import jmp

POLICIES: dict[str, str] = {
    'bf16': 'params=float32,compute=bfloat16,output=float32',
}


def get_policy(name: Optional[str]) -> Optional[jmp.Policy]:
  """The jmp policy called `name` (a key of POLICIES, or a jmp policy
  string); None for None / 'fp32' / 'float32'."""
  if name is None or name in ('fp32', 'float32'):
    return None
  return jmp.get_policy(POLICIES.get(name, name))


@contextlib.contextmanager
def policy_scope(module_cls: type[hk.Module],
                 name: Optional[str]) -> Iterator[None]:
  """Applies the named policy to `module_cls` inside the block (no-op for
  None). Enter it inside the transformed function, before calling the
  module."""
  policy = get_policy(name)
  if policy is None:
    yield
    return
  with hk.mixed_precision.push_policy(module_cls, policy):
    yield
