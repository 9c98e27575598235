r"""Workloads W1 and W2 (issue 6): the speed comparisons with the PyTorch
Perceivers (benchmarks/compare_pytorch.py).

  python -m launch.benchmark --workload=W1
  python -m launch.benchmark --workload=W1 --cpu_kernels=false  # plain autodiff
  python -m launch.benchmark --workload=W2:side=128            # W2, M = 16,384

W1: batch 16 of 64x64x3 images flattened to M = 4,096 inputs with 32 Fourier
bands per axis (C = 3 + 2 * (2 * 32 + 1) = 133); latents N = 256 x D = 512;
one cross-attend (1 head, Q/K/V width C); a latent Transformer of 4
self-attention layers (8 heads, width 512) applied in 2 blocks with shared
weights; MLP widening 1; mean over latents, linear to 1,000 classes; softmax
cross-entropy; one Adam update; float32. 7,656,115 parameters.

W2: the same model at batch 4 over S x S x 3 images, S in `W2_SIDES`
(M = S^2 = 1,024 .. 65,536), the Fourier features' maximum resolution S per
axis. C does not depend on S, so neither does the parameter count.

Config argument (`--config=configs/w1.py:key=value,...`):
  side        image side S (default 64, W1's).
  batch_size  global batch (default 16, W1's; W2 uses `W2_BATCH_SIZE`).
"""

from configs import common
from configs import imagenet

BATCH_SIZE = 16  # W1
W2_BATCH_SIZE = 4
W2_SIDES = (32, 64, 128, 256)  # M = 1,024, 4,096, 16,384, 65,536
NUM_PARAMS = 7_656_115  # W1 and W2 at every side, both implementations


def get_config(arg=None):
  arg = common.parse_arg(arg, side=64, batch_size=BATCH_SIZE)
  if arg.side <= 0 or arg.batch_size <= 0:
    raise ValueError(f'side and batch_size must be positive, got side='
                     f'{arg.side}, batch_size={arg.batch_size}.')
  config = imagenet.get_config('synthetic')
  config.input_shape = (arg.side, arg.side, 3)
  config.input.update(num_bands=32, max_resolution=(arg.side, arg.side))
  config.model.update(num_latents=256, latent_channels=512, num_blocks=2,
                      num_cross_attends=1, num_self_attends_per_block=4,
                      num_cross_heads=1, num_self_heads=8)
  config.batch_size = arg.batch_size
  config.optimizer.update(name='adamw', lr=1e-3, weight_decay=0.0,
                          clip_grad_norm=0.0)
  config.label_smoothing = 0.0
  config.mixup.update(mixup_alpha=0.0, cutmix_alpha=0.0)
  return config
