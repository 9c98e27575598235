r"""Perceiver on ImageNet (paper Table 1: 78.0% top-1; Tables 2, 5, 6, 7 ablations).

  python -m experiments.train --config=configs/imagenet.py --workdir=/tmp/imagenet
  python -m launch.summary --config=configs/imagenet.py   # 44.9M params, 707 GFLOPs

Config argument (`--config=configs/imagenet.py:key=value,...`):
  runlocal   shrink model, batch and steps to a laptop CPU.
  permuted   the fixed-pixel-permutation ImageNet of Table 2.
  synthetic  made-up data of the same shapes (experiments/data/synthetic.py).

Training (paper section 3): LAMB, lr 0.004, x0.1 at epochs 84, 102, 114 of 120.
Chosen where the paper is silent (marked '# chosen'): batch 1024, weight decay
0.1 (not on biases / LayerNorm), grad-norm clip 10, label smoothing 0.1,
MixUp 0.2 / CutMix 1.0 (the later Perceiver IO recipe), no warm-up.

Sweeps (python -m launch.sweep --config=configs/imagenet.py --sweep=NAME):
  cross_attends (Table 6), weight_sharing (Table 7), position_encoding (Table 2),
  lr.

model.cpu_kernels: True (default) computes the blocks with perceiver/cpu_kernels.py
(custom gradients, fused projections: same parameters, same numbers), the faster
setting on XLA:CPU today (1.4-1.8x per train step, benchmarks/RESULTS.md,
2026-11-29); False uses Haiku modules and plain autodiff, to compare on an
accelerator where XLA's own fusions may win (launch.benchmark --cpu_kernels=false).

The paper's ablations are plain fields: model.num_blocks (R), .num_self_attends_per_block (L),
.cross_attend_arrangement ('interleaved' | 'start'), .share_weights, input.position_encoding
('fourier' | 'learned' | 'none').
"""

from configs import common
import ml_collections
from ml_collections import config_dict


def get_config(arg=None):
  arg = common.parse_arg(arg, runlocal=False, permuted=False, synthetic=False)
  config = ml_collections.ConfigDict()
  config.dataset = 'imagenet'
  config.input_shape = (224, 224, 3)

  config.input_name = 'image'
  config.input = dict(
      input_channels=3,
      position_encoding='fourier',  # Table 2: 'learned' (128 channels, init 1.0)
      num_bands=64,
      max_resolution=(224, 224),
      learned_channels=128,
      learned_init_scale=1.0,
      # Table 2, permuted: one fixed pixel permutation after the positions.
      permutation_seed=0 if arg.permuted else config_dict.placeholder(int),
      # Position features projected once per batch in the cross-attends
      # (perceiver/byte_array.py): the same numbers, less work.
      factored=True,
  )

  config.model_name = 'perceiver'
  config.model = dict(
      num_classes=1000,
      num_latents=512,
      latent_channels=1024,
      num_blocks=8,
      num_self_attends_per_block=6,
      num_cross_attends=config_dict.placeholder(int),  # None: = num_blocks
      num_cross_heads=1,
      num_self_heads=8,
      cross_attend_arrangement='interleaved',
      share_weights=True,
      cross_attend_chunk_size=config_dict.placeholder(int),
      remat_latent_blocks=False,
      cpu_kernels=True,  # faster on CPU; see the docstring
  )
  config.mixed_precision = config_dict.placeholder(str)  # 'bf16', precision.py

  if arg.runlocal:
    config.input_shape = (32, 32, 3)
    config.input.num_bands = 8
    config.input.max_resolution = (32, 32)
    config.model.update(num_latents=32, latent_channels=64, num_blocks=2,
                        num_self_attends_per_block=2, num_self_heads=4)
  _training(config, arg)
  return config


def _training(config, arg):
  """Data, optimizer, schedule, evaluation and cadence."""
  config.seed = 0
  config.train_split = 'train'
  config.eval_split = 'validation'
  config.data = dict(  # experiments/data/imagenet.py load() kwargs
      data_dir=config_dict.placeholder(str),  # TFDS data dir (None: default)
      manual_dir=config_dict.placeholder(str),  # ILSVRC2012 tars, to prepare
      image_size=config.input_shape[0],
      randaugment_layers=2, randaugment_magnitude=9.0,  # chosen: N=2, M=9
      shuffle_buffer=10_000,
  )  # MixUp/CutMix run on the device (config.mixup), not in the pipeline.
  config.batch_size = 1024  # chosen
  config.eval_batch_size = 1024
  config.num_epochs = 120.0
  config.num_train_steps = config_dict.placeholder(int)
  config.loss = 'softmax'
  config.label_smoothing = 0.1  # chosen
  config.mixup = dict(mixup_alpha=0.2, cutmix_alpha=1.0,  # chosen
                      switch_prob=0.5)  # chosen
  config.optimizer = dict(
      name='lamb',  # the paper's optimizer ('adamw' also available)
      lr=0.004,
      b1=0.9,
      b2=0.999,
      eps=1e-6,
      weight_decay=0.1,
      clip_grad_norm=10.0,
  )  # optimizer and lr: paper section 4.1 (docs/paper.md); the rest chosen
  config.schedule = dict(kind='piecewise', warmup=0,  # chosen: no warm-up
                         boundaries=(84, 102, 114), decay_factor=0.1,
                         unit='epochs')
  config.log_every_steps = 100
  config.eval_every_steps = 12_500  # chosen: ~10 epochs at batch 1024
  config.checkpoint_every_steps = 2_000
  config.keep_checkpoints = 3
  if arg.runlocal:
    config.batch_size = 16
    config.eval_batch_size = 32
    config.num_epochs = None
    config.num_train_steps = 40
    config.schedule.update(boundaries=(28, 34, 38), unit='steps')
    config.log_every_steps = 10
    config.eval_every_steps = 20
    config.checkpoint_every_steps = 20
  if arg.synthetic:
    common.use_synthetic_data(config)


def sweep_cross_attends():
  """Table 6: number and arrangement of cross-attends (before the R = 8
  latent blocks)."""
  for arrangement in ('start', 'interleaved'):
    for num in (1, 2, 4, 8):
      yield {'model.num_cross_attends': num,
             'model.cross_attend_arrangement': arrangement}


def sweep_weight_sharing():
  """Table 7: with and without weight sharing."""
  for share in (True, False):
    yield {'model.share_weights': share}


def sweep_position_encoding():
  """Table 2 (raw pixels): Fourier features vs learned positions."""
  for kind in ('fourier', 'learned'):
    yield {'input.position_encoding': kind}


def sweep_lr():
  for lr in (0.002, 0.004, 0.008):
    yield {'optimizer.lr': lr}
