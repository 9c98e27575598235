r"""Figures of a training workdir, written as PNGs into it.

  # Training curves (every scalar of metrics.jsonl) -> WORKDIR/curves.png:
  python -m launch.plot --workdir=/tmp/fmnist
  # Paper Fig. 3: cross-attention logits of the first, second and last
  # cross-attend for evaluation example K -> WORKDIR/attention.png:
  python -m launch.plot --workdir=/tmp/fmnist --attention --index=K

The attention figure restores the latest checkpoint with the config the run
saved (WORKDIR/config.json); it needs a Perceiver over images (permuted
models are drawn un-permuted, on the pixel grid). See experiments/tools/figures.py.
"""

from __future__ import annotations

import sys

from absl import app
from absl import flags

from experiments import checkpointing
from experiments.tools import figures

_WORKDIR = flags.DEFINE_string('workdir', None,
                               'Workdir of an experiments.train run.')
_ATTENTION = flags.DEFINE_bool(
    'attention', False,
    'Draw the cross-attention maps (paper Fig. 3) instead of the curves.')
_INDEX = flags.DEFINE_integer('index', 0, 'Evaluation example to draw.')
_NUM_LATENTS = flags.DEFINE_integer(
    'num_latents', 8, 'Latents per cross-attend (spread evenly over N).')


def _fail(message: str):
  print(f'launch.plot: error: {message}', file=sys.stderr, flush=True)
  sys.exit(2)


def main(argv):
  if len(argv) > 1:
    _fail(f'unexpected arguments: {" ".join(argv[1:])}')
  if not _WORKDIR.value:
    _fail('--workdir is required.')
  if _INDEX.value < 0 or _NUM_LATENTS.value < 1:
    _fail('--index must be >= 0 and --num_latents >= 1.')
  checkpointing.quiet_orbax_logs()
  try:
    if _ATTENTION.value:
      path = figures.plot_attention(_WORKDIR.value, index=_INDEX.value,
                                    num_latents=_NUM_LATENTS.value)
    else:
      path = figures.plot_curves(_WORKDIR.value)
  except figures.FigureError as e:
    _fail(str(e))
  print(path)


if __name__ == '__main__':
  app.run(main)
