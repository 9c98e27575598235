r"""Perceiver on ModelNet40 point clouds (paper Table 4: 85.7% top-1).

  python -m experiments.train --config=configs/modelnet40.py --workdir=/tmp/modelnet40
  python -m experiments.train --config=configs/modelnet40.py:runlocal --workdir=/tmp/mn40

Config argument:
  runlocal       shrink model, batch and steps to a laptop CPU.
  max_frequency  the paper's "max frequency 1120" (default), read as the highest
                 band frequency: mu = 2 x 1120 = 2240, 10x ImageNet's mu/2 = 112.
                 The other reading (mu = 1120) is max_frequency=560.
"""

from configs import common
import ml_collections


def get_config(arg=None):
  arg = common.parse_arg(arg, runlocal=False, max_frequency=1120.0)
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
      num_cross_heads=1,
      num_self_heads=8,
      cross_attend_arrangement='interleaved',
      share_weights=True,  # chosen: the paper's ImageNet sharing scheme
      cross_attend_chunk_size=None,
      remat_latent_blocks=False,
  )

  if arg.runlocal:
    config.input_shape = (256, 3)
    config.input.num_bands = 8
    config.model.update(num_latents=32, latent_channels=64,
                        num_self_attends_per_block=2, num_self_heads=4)
  return config
