r"""Perceiver on ModelNet40 point clouds (paper Table 4: 85.7% top-1).

  python -m experiments.train --config=configs/modelnet40.py --workdir=/tmp/modelnet40
  python -m experiments.train --config=configs/modelnet40.py:runlocal --workdir=/tmp/mn40

Config argument:
  runlocal       shrink model, batch and steps to a laptop CPU.
  synthetic      made-up data of the same shapes (experiments/data/synthetic.py).
  max_frequency  the paper's "max frequency 1120" (default), read as the highest
                 band frequency: mu = 2 x 1120 = 2240, 10x ImageNet's mu/2 = 112.
                 The other reading (mu = 1120) is max_frequency=560.

Training (paper section 3): LAMB, constant lr 1e-3, batch 512, ~50k steps.
Chosen where the paper is silent (marked '# chosen'): weight decay 0.1 (not on
biases / LayerNorm), grad-norm clip 10, no label smoothing, no warm-up.

Sweeps: lr, weight_decay.
"""

from configs import common
import ml_collections
from ml_collections import config_dict


def get_config(arg=None):
  arg = common.parse_arg(arg, runlocal=False, max_frequency=1120.0,
                         synthetic=False)
  config = ml_collections.ConfigDict()
  config.dataset = 'modelnet40'
  config.input_shape = (2048, 3)

  config.input_name = 'points'
  # Chosen reading of "max frequency 1120": the highest band frequency is 1120,
  # so mu = 2 * 1120 = 2240 (bands linear in 1..mu/2).
  mu = 2 * arg.max_frequency
  config.input = dict(num_bands=64, max_resolution=(mu, mu, mu),
                      input_channels=3)

  config.model_name = 'perceiver'
  config.model = dict(
      num_classes=40,
      num_latents=512,
      latent_channels=1024,
      num_blocks=2,
      num_self_attends_per_block=6,
      num_cross_attends=config_dict.placeholder(int),  # None: = num_blocks
      num_cross_heads=1,
      num_self_heads=8,
      cross_attend_arrangement='interleaved',
      share_weights=True,  # chosen: the paper's ImageNet sharing scheme
      cross_attend_chunk_size=config_dict.placeholder(int),
      remat_latent_blocks=False,
  )
  config.mixed_precision = config_dict.placeholder(str)  # 'bf16', precision.py

  if arg.runlocal:
    config.input_shape = (256, 3)
    config.input.num_bands = 8
    config.model.update(num_latents=32, latent_channels=64,
                        num_self_attends_per_block=2, num_self_heads=4)
  _training(config, arg)
  return config


def _training(config, arg):
  """Data, optimizer, schedule, evaluation and cadence."""
  config.seed = 0
  config.train_split = 'train'
  config.eval_split = 'test'
  config.data = dict(  # experiments/data/modelnet40.py load() kwargs
      data_dir=config_dict.placeholder(str),  # TFDS data dir (None: default)
      manual_dir=config_dict.placeholder(str),  # downloaded files, to prepare
      variant='ply_hdf5_2048',
      augment=True,  # paper: random per-point scale in [0.99, 1.01]
  )
  config.batch_size = 512
  config.eval_batch_size = 512
  config.num_train_steps = 50_000
  config.num_epochs = config_dict.placeholder(float)
  config.loss = 'softmax'
  config.label_smoothing = 0.0  # chosen
  config.mixup = dict(mixup_alpha=0.0, cutmix_alpha=0.0, switch_prob=0.5)
  config.optimizer = dict(
      name='lamb',  # the paper's optimizer ('adamw' also available)
      lr=1e-3,
      b1=0.9,
      b2=0.999,
      eps=1e-6,
      weight_decay=0.1,
      clip_grad_norm=10.0,
  )  # lr as PAPER.md section 3 where given; the rest chosen
  config.schedule = dict(kind='constant', warmup=0, boundaries=(),
                         decay_factor=0.1, unit='steps')
  config.log_every_steps = 100
  config.eval_every_steps = 5_000
  config.checkpoint_every_steps = 2_000
  config.keep_checkpoints = 3
  if arg.runlocal:
    config.batch_size = 16
    config.eval_batch_size = 32
    config.num_train_steps = 40
    config.log_every_steps = 10
    config.eval_every_steps = 20
    config.checkpoint_every_steps = 20
  if arg.synthetic:
    common.use_synthetic_data(config)


def sweep_lr():
  for lr in (3e-4, 1e-3, 3e-3):
    yield {'optimizer.lr': lr}


def sweep_weight_decay():
  for weight_decay in (0.0, 0.01, 0.1):
    yield {'optimizer.weight_decay': weight_decay}
