r"""Support for tests of the runner: a tiny synthetic config and helpers to run
`experiments.train` in a subprocess and read what it wrote.

The config here is a test fixture, not an experiment:

  python -m experiments.train --config=tests/testing.py --workdir=/tmp/t

Shapes: a Perceiver over 8x8x1 made-up images (8 latents x 16 channels, one
block of one self-attention), 4 classes; global batch 16, so it divides over
1, 2, 4 or 8 devices. A run is 24 steps and compiles in seconds on a CPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any, Optional, Sequence

import ml_collections
from ml_collections import config_dict
import numpy as np

from configs import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_PATH = os.path.join(ROOT, 'tests', 'testing.py')


def get_config(arg=None) -> ml_collections.ConfigDict:
  """The tiny config; `multi_label` switches to sigmoid loss, 2-clip eval."""
  arg = common.parse_arg(arg, multi_label=False)
  config = ml_collections.ConfigDict()
  config.dataset = 'synthetic'
  config.input_shape = (8, 8, 1)
  config.input_name = 'image'
  config.input = dict(input_channels=1, position_encoding='fourier',
                      num_bands=2, max_resolution=(8, 8))
  config.model_name = 'perceiver'
  config.model = dict(num_classes=4, num_latents=8, latent_channels=16,
                      num_blocks=1, num_self_attends_per_block=1,
                      num_cross_heads=1, num_self_heads=2)
  config.seed = 0
  config.train_split = 'train'
  config.eval_split = 'test'
  config.data = dict(data_dir=config_dict.placeholder(str),
                     input_shape=config.input_shape, num_classes=4,
                     multi_label=arg.multi_label,
                     num_clips=2 if arg.multi_label else 1,
                     num_train_examples=64, num_eval_examples=20,
                     seconds_per_batch=0.0)
  config.batch_size = 16
  config.eval_batch_size = 16  # 20 examples: the last batch is padded.
  config.num_train_steps = 24
  config.num_epochs = config_dict.placeholder(float)
  config.loss = 'sigmoid' if arg.multi_label else 'softmax'
  config.label_smoothing = 0.0
  config.mixup = dict(mixup_alpha=0.0, cutmix_alpha=0.0, switch_prob=0.5)
  config.optimizer = dict(lr=1e-2, b1=0.9, b2=0.999, eps=1e-6,
                          weight_decay=0.01, clip_grad_norm=1.0)
  config.schedule = dict(kind='cosine', warmup=4, boundaries=(),
                         decay_factor=0.1, unit='steps')
  config.log_every_steps = 2
  config.eval_every_steps = 12
  config.checkpoint_every_steps = 8
  config.keep_checkpoints = 5
  return config


def sweep_lr():
  for lr in (1e-3, 1e-2):
    yield {'optimizer.lr': lr}


def subprocess_env(num_devices: int = 1,
                   cache_dir: Optional[str] = None) -> dict[str, str]:
  """Environment for a CPU subprocess with `num_devices` fake devices."""
  env = dict(os.environ)
  # Optimisation level 0 halves XLA's CPU compile times; the tiny model's
  # run time does not matter.
  env['XLA_FLAGS'] = ' '.join(
      ['--xla_backend_optimization_level=0'] +
      ([f'--xla_force_host_platform_device_count={num_devices}']
       if num_devices > 1 else []))
  env['JAX_PLATFORMS'] = 'cpu'
  env['TF_CPP_MIN_LOG_LEVEL'] = '3'
  env['PYTHONPATH'] = ROOT + os.pathsep + env.get('PYTHONPATH', '')
  if cache_dir:
    env['JAX_COMPILATION_CACHE_DIR'] = cache_dir
  return env


def train_command(workdir: str, overrides: Sequence[str] = (),
                  config: str = CONFIG_PATH,
                  extra: Sequence[str] = ()) -> list[str]:
  return ([sys.executable, '-m', 'experiments.train', f'--config={config}',
           f'--workdir={workdir}'] + [f'--config.{o}' for o in overrides] +
          list(extra))


def run_train(workdir: str, overrides: Sequence[str] = (), *,
              num_devices: int = 1, cache_dir: Optional[str] = None,
              timeout: float = 240, **kwargs) -> subprocess.CompletedProcess:
  """Runs experiments.train to completion; returns its CompletedProcess."""
  return subprocess.run(
      train_command(workdir, overrides, **kwargs), cwd=ROOT,
      env=subprocess_env(num_devices, cache_dir), capture_output=True,
      text=True, timeout=timeout, check=False)


def read_jsonl(workdir: str) -> list[dict[str, Any]]:
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f if line.strip()]


def checkpoint_steps(workdir: str) -> list[int]:
  directory = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(directory):
    return []
  return sorted(int(d) for d in os.listdir(directory) if d.isdigit())


def read_checkpoint(workdir: str, step: Optional[int] = None) -> dict:
  """The saved train state (latest step by default) as nested dicts of numpy
  arrays, read without devices or a target structure."""
  import jax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  step = checkpoint_steps(workdir)[-1] if step is None else step
  path = os.path.join(workdir, 'checkpoints', str(step), 'default')
  checkpointer = ocp.PyTreeCheckpointer()
  tree = checkpointer.metadata(path).item_metadata.tree
  restore_args = jax.tree.map(
      lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree,
      is_leaf=lambda x: hasattr(x, 'shape'))
  return checkpointer.restore(path, restore_args=restore_args)
