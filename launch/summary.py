r"""Model summary of a config: parameters, FLOPs per example, per-module split.

  python -m launch.summary --config=configs/imagenet.py
  python -m launch.summary --config=configs/imagenet.py --json
  python -m launch.summary --config=configs/imagenet.py --config.model.num_blocks=4

FLOPs count a multiply and an add as two operations, as the paper does, and
count every application of shared weights (experiments/tools/flops.py). With --xla
the summary also reports XLA's cost analysis of the compiled forward pass,
which is lower for shared cross-attends: XLA computes their identical keys and
values once.
"""

from __future__ import annotations

import json
import sys

from absl import app
from absl import flags
from experiments import config_loader
from experiments.tools import model_summary

_CONFIG = config_loader.define_flag()
_JSON = flags.DEFINE_bool('json', False, 'Print one JSON object.')
_XLA = flags.DEFINE_bool('xla', False, 'Also compile and report XLA FLOPs.')
_DEPTH = flags.DEFINE_integer('depth', 2, 'Module path depth of the breakdown.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  s = model_summary.summarize(_CONFIG.value, depth=_DEPTH.value,
                              xla=_XLA.value)
  print(json.dumps(s) if _JSON.value else model_summary.format_summary(s))


if __name__ == '__main__':
  sys.exit(app.run(main))
