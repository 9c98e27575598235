r"""Perceiver on Fashion-MNIST: the project's embedded default, CPU-scale stand-in
for ImageNet (the README's main job; raw vs permuted pixels as in paper Table 2).

  python -m experiments.train --config=configs/fashion_mnist.py --workdir=/tmp/fmnist
  python -m experiments.train --config=configs/fashion_mnist.py:permuted --workdir=/tmp/fmnist_perm

Config argument: permuted (the fixed pixel permutation, applied after the
position features are attached), runlocal (fewer steps, for smoke tests).
"""

from configs import common
import ml_collections


def get_config(arg=None):
  arg = common.parse_arg(arg, runlocal=False, permuted=False)
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
      permutation_seed=0 if arg.permuted else None,
  )

  config.model_name = 'perceiver'
  config.model = dict(
      num_classes=10,
      num_latents=32,
      latent_channels=128,
      num_blocks=2,
      num_self_attends_per_block=2,
      num_cross_heads=1,
      num_self_heads=4,
      cross_attend_arrangement='interleaved',
      share_weights=True,
      cross_attend_chunk_size=None,
      remat_latent_blocks=False,
  )
  return config
