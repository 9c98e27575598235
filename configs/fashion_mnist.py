r"""Perceiver on Fashion-MNIST: the project's embedded default, CPU-scale stand-in
for ImageNet (the README's main job; raw vs permuted pixels as in paper Table 2).

  python -m experiments.train --config=configs/fashion_mnist.py --workdir=/tmp/fmnist
  python -m experiments.train --config=configs/fashion_mnist.py:permuted --workdir=/tmp/fmnist_perm

Config argument: permuted (the fixed pixel permutation, applied after the
position features are attached), runlocal (fewer steps, for smoke tests),
synthetic (made-up data of the same shapes: experiments/data/synthetic.py).
Training is CPU-scale; nothing here is from the paper, so every choice below
is marked chosen.

model.cpu_kernels: True (default) computes the blocks with perceiver/cpu_kernels.py
(custom gradients, fused projections: same parameters, same numbers), the faster
setting on XLA:CPU today (1.4-1.8x per train step, benchmarks/RESULTS.md,
2026-11-29); False uses Haiku modules and plain autodiff, to compare on an
accelerator where XLA's own fusions may win (launch.benchmark --cpu_kernels=false).

Sweeps (python -m launch.sweep --config=configs/fashion_mnist.py --sweep=lr):
sweep_lr, sweep_position_encoding.
"""

from configs import common
import ml_collections
from ml_collections import config_dict


def get_config(arg=None):
  arg = common.parse_arg(arg, runlocal=False, permuted=False, synthetic=False)
  config = ml_collections.ConfigDict()
  config.dataset = 'fashion_mnist'
  config.input_shape = (28, 28, 1)

  config.input_name = 'image'
  config.input = dict(
      input_channels=1,
      position_encoding='fourier',
      num_bands=8,
      max_resolution=(28, 28),
      learned_channels=32,
      learned_init_scale=1.0,
      permutation_seed=0 if arg.permuted else config_dict.placeholder(int),
      # Position features projected once per batch in the cross-attends
      # (perceiver/byte_array.py): the same numbers, less work.
      factored=True,
  )

  config.model_name = 'perceiver'
  config.model = dict(
      num_classes=10,
      # Chosen for the 15-minute CPU budget of the README's main job: 16 x 64
      # latents (train-step speed on CPU: benchmarks/RESULTS.md).
      num_latents=16,
      latent_channels=64,
      num_blocks=2,
      num_self_attends_per_block=2,
      num_cross_attends=config_dict.placeholder(int),  # None: = num_blocks
      num_cross_heads=1,
      num_self_heads=4,
      cross_attend_arrangement='interleaved',
      share_weights=True,
      cross_attend_chunk_size=config_dict.placeholder(int),
      remat_latent_blocks=False,
      cpu_kernels=True,  # faster on CPU; see the docstring
  )
  config.mixed_precision = config_dict.placeholder(str)  # 'bf16', precision.py
  _training(config, arg)
  return config


def _training(config, arg):
  """Data, optimizer, schedule, evaluation and cadence (all chosen)."""
  config.seed = 0
  config.train_split = 'train'
  config.eval_split = 'test'
  config.data = dict(
      data_dir=config_dict.placeholder(str),  # prepared TFDS data, if any
      manual_dir=config_dict.placeholder(str),  # None: the module's default
      augment=False,  # chosen: no augmentation in a 3-epoch budget
      num_train_examples=config_dict.placeholder(int),
  )
  config.batch_size = 256  # chosen
  config.eval_batch_size = 500
  config.num_train_steps = config_dict.placeholder(int)
  config.num_epochs = 3.0  # chosen: CPU-scale (the README's main job)
  config.loss = 'softmax'
  config.label_smoothing = 0.1  # chosen
  config.mixup = dict(mixup_alpha=0.0, cutmix_alpha=0.0, switch_prob=0.5)
  config.optimizer = dict(
      name='lamb',  # the paper's optimizer ('adamw' also available)
      lr=1e-2,  # chosen: best of 2e-3 / 4e-3 / 1e-2 / 2e-2 after one epoch
      b1=0.9,
      b2=0.999,
      eps=1e-6,
      weight_decay=0.01,
      clip_grad_norm=10.0,
  )  # LAMB as the paper's ImageNet (section 4.1, docs/paper.md); the rest chosen
  config.schedule = dict(kind='cosine', warmup=0.5, boundaries=(),  # chosen
                         decay_factor=0.1, unit='epochs')
  config.log_every_steps = 100
  config.eval_every_steps = 0  # final evaluation only
  config.checkpoint_every_steps = 1000
  config.keep_checkpoints = 3
  if arg.runlocal:
    config.data.num_train_examples = 512
    config.batch_size = 32
    config.eval_batch_size = 200
    config.num_epochs = None
    config.num_train_steps = 40
    config.schedule.update(warmup=4, unit='steps')
    config.log_every_steps = 10
    config.eval_every_steps = 20
    config.checkpoint_every_steps = 20
  if arg.synthetic:
    common.use_synthetic_data(config)


def sweep_lr():
  for lr in (4e-3, 1e-2, 2e-2):
    yield {'optimizer.lr': lr}


def sweep_position_encoding():
  for kind in ('fourier', 'learned'):
    yield {'input.position_encoding': kind}
