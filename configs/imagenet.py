r"""Perceiver on ImageNet (paper Table 1: 78.0% top-1; Tables 2, 5, 6, 7 ablations).

  python -m experiments.train --config=configs/imagenet.py --workdir=/tmp/imagenet
  python -m launch.summary --config=configs/imagenet.py   # 44.9M params, 707 GFLOPs

Config argument (`--config=configs/imagenet.py:key=value,...`):
  runlocal   shrink model, batch and steps to a laptop CPU.
  permuted   the fixed-pixel-permutation ImageNet of Table 2.

The paper's ablations are plain fields: model.num_blocks (R), .num_self_attends_per_block (L),
.cross_attend_arrangement ('interleaved' | 'start'), .share_weights, input.position_encoding
('fourier' | 'learned' | 'none').
"""

from configs import common
import ml_collections


def get_config(arg=None):
  arg = common.parse_arg(arg, runlocal=False, permuted=False)
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
      permutation_seed=0 if arg.permuted else None,  # Table 2, permuted
  )

  config.model_name = 'perceiver'
  config.model = dict(
      num_classes=1000,
      num_latents=512,
      latent_channels=1024,
      num_blocks=8,
      num_self_attends_per_block=6,
      num_cross_heads=1,
      num_self_heads=8,
      cross_attend_arrangement='interleaved',
      share_weights=True,
      cross_attend_chunk_size=None,
      remat_latent_blocks=False,
  )

  if arg.runlocal:
    config.input_shape = (32, 32, 3)
    config.input.num_bands = 8
    config.input.max_resolution = (32, 32)
    config.model.update(num_latents=32, latent_channels=64, num_blocks=2,
                        num_self_attends_per_block=2, num_self_heads=4)
  return config
