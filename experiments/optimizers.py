"""LAMB with the paper's learning-rate schedules (docs/paper.md, 'Optimizer').

  optimizer  clip_by_global_norm(clip_grad_norm) -> LAMB(lr schedule,
             b1, b2, eps, weight_decay masked to weight matrices / latents)
  schedules  linear warm-up from 0, then
               'constant'   lr
               'piecewise'  lr * decay_factor**(number of boundaries passed)
                            (ImageNet: x0.1 at epochs 84, 102, 114 of 120)
               'cosine'     cosine decay from lr to 0 at the last step

Durations (warm-up, boundaries) are in `schedule.unit`: 'steps' or 'epochs';
an epoch is num_examples(train split) / global batch size steps.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import optax

SCHEDULE_KINDS = ('constant', 'piecewise', 'cosine')
UNITS = ('steps', 'epochs')
# Parameters never decayed: biases and LayerNorm scales/offsets (Haiku names).
NO_DECAY_NAMES = ('b', 'offset', 'scale')


def to_steps(value: float, unit: str,
             steps_per_epoch: Callable[[], float]) -> int:
  """A duration in `unit` as a whole number of steps."""
  if unit not in UNITS:
    raise ValueError(f'Unknown unit {unit!r}; known: {UNITS}.')
  if unit == 'steps':
    return int(value)
  return int(round(value * steps_per_epoch()))


def make_schedule(*, lr: float, kind: str, warmup: float = 0,
                  boundaries=(), decay_factor: float = 0.1,
                  unit: str = 'steps', total_steps: int,
                  steps_per_epoch: Callable[[], float] = lambda: 1.0
                  ) -> optax.Schedule:
  """The learning rate as a function of the step (0-based)."""
  if kind not in SCHEDULE_KINDS:
    raise ValueError(f'Unknown schedule.kind {kind!r}; known: '
                     f'{SCHEDULE_KINDS}.')
  warmup_steps = to_steps(warmup, unit, steps_per_epoch)
  if kind == 'constant':
    main = optax.constant_schedule(lr)
  elif kind == 'piecewise':
    steps = [to_steps(b, unit, steps_per_epoch) - warmup_steps
             for b in boundaries]
    main = optax.piecewise_constant_schedule(
        lr, {s: decay_factor for s in steps})
  else:
    main = optax.cosine_decay_schedule(
        lr, decay_steps=max(total_steps - warmup_steps, 1))
  if warmup_steps <= 0:
    return main
  warm = optax.linear_schedule(0.0, lr, warmup_steps)
  return optax.join_schedules([warm, main], [warmup_steps])


def weight_decay_mask(params: Any) -> Any:
  """True for parameters that weight decay applies to.

  Biases ('b') and LayerNorm parameters (any module whose name contains
  'norm', or leaves named 'scale'/'offset') are excluded; linear weights,
  latents and learned position encodings are decayed.
  """
  def decays(path, _):
    names = [getattr(k, 'key', str(k)) for k in path]
    module, leaf = '/'.join(names[:-1]), names[-1]
    return leaf not in NO_DECAY_NAMES and 'norm' not in module
  return jax.tree_util.tree_map_with_path(decays, params)


OPTIMIZERS = ('lamb', 'adamw')


def make_optimizer(*, lr: float, b1: float = 0.9, b2: float = 0.999,
                   eps: float = 1e-6, weight_decay: float = 0.0,
                   clip_grad_norm: Optional[float] = None,
                   schedule: optax.Schedule,
                   name: str = 'lamb') -> optax.GradientTransformation:
  """Global-norm clipping, then LAMB (the paper's) or AdamW (Adam when
  weight_decay is 0), weight decay masked off biases and LayerNorm."""
  del lr  # The schedule carries it.
  if name not in OPTIMIZERS:
    raise ValueError(f'Unknown optimizer.name {name!r}; known: {OPTIMIZERS}.')
  parts = []
  if clip_grad_norm:
    parts.append(optax.clip_by_global_norm(clip_grad_norm))
  make = optax.lamb if name == 'lamb' else optax.adamw
  parts.append(make(schedule, b1=b1, b2=b2, eps=eps,
                    weight_decay=weight_decay, mask=weight_decay_mask))
  return optax.chain(*parts)


def from_config(config, *, total_steps: int,
                steps_per_epoch: Callable[[], float]
                ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """(optimizer, schedule) from config.optimizer and config.schedule."""
  opt = config.optimizer.to_dict()
  schedule = make_schedule(lr=opt['lr'], total_steps=total_steps,
                           steps_per_epoch=steps_per_epoch,
                           **config.schedule.to_dict())
  return make_optimizer(schedule=schedule, **opt), schedule
