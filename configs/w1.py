r"""Workload W1 (issue 6): the speed comparison with the PyTorch Perceivers.

  python -m launch.benchmark --workload=W1
  python -m launch.benchmark --workload=W1 --cpu_kernels=false  # plain autodiff

Batch 16 of 64x64x3 images flattened to M = 4,096 inputs with 32 Fourier
bands per axis (C = 3 + 2 * (2 * 32 + 1) = 133); latents N = 256 x D = 512;
one cross-attend (1 head, Q/K/V width C); a latent Transformer of 4
self-attention layers (8 heads, width 512) applied in 2 blocks with shared
weights; MLP widening 1; mean over latents, linear to 1,000 classes; softmax
cross-entropy; one Adam update; float32. 7.66M parameters.
"""

from configs import imagenet

BATCH_SIZE = 16


def get_config(arg=None):
  del arg
  config = imagenet.get_config('synthetic')
  config.input_shape = (64, 64, 3)
  config.input.update(num_bands=32, max_resolution=(64, 64))
  config.model.update(num_latents=256, latent_channels=512, num_blocks=2,
                      num_cross_attends=1, num_self_attends_per_block=4,
                      num_cross_heads=1, num_self_heads=8)
  config.batch_size = BATCH_SIZE
  config.optimizer.update(name='adamw', lr=1e-3, weight_decay=0.0,
                          clip_grad_norm=0.0)
  config.label_smoothing = 0.0
  config.mixup.update(mixup_alpha=0.0, cutmix_alpha=0.0)
  return config
