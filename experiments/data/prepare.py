r"""Prepares a dataset made from Debian packages of real recordings.

  python -m experiments.data.prepare --dataset=drums \
      [--out=workdirs/data/drums] [--source=FOLDER_OR_DEB] [--seed=0]
  python -m experiments.data.prepare --dataset=kicad \
      [--out=workdirs/data/kicad] [--source=FOLDER_OR_DEB] [--seed=0]

  drums  real drum recordings (Debian hydrogen-drumkits) mixed into
         multi-label clips in AudioSet's layout (experiments/data/drums.py);
         read by configs/audioset.py:data=drums.
  kicad  real CAD models of electronic parts (Debian kicad-packages3d) as
         point clouds in ModelNet40's HDF5 layout
         (experiments/data/cad_points.py); read by
         configs/modelnet40.py:data=kicad.

Each dataset module named in DATASETS has
`prepare(out_dir, *, source=None, seed=0) -> dict` (a summary); it is
imported only when chosen. Prints the summary as JSON and the time taken;
an error is one line on stderr and exit status 1.
"""
import importlib
import json
import subprocess
import sys
import time

from absl import app
from absl import flags

DATASETS = {'drums': 'experiments.data.drums',
            'kicad': 'experiments.data.cad_points'}


def prepare(dataset: str, out_dir: str | None = None, *,
            source: str | None = None, seed: int = 0) -> dict:
  """Runs DATASETS[dataset].prepare; out_dir defaults to
  workdirs/data/<dataset>."""
  if dataset not in DATASETS:
    raise ValueError(f'Unknown dataset {dataset!r}; known: '
                     f'{sorted(DATASETS)}.')
  module = importlib.import_module(DATASETS[dataset])
  return module.prepare(out_dir or f'workdirs/data/{dataset}', source=source,
                        seed=seed)


def define_flags() -> None:
  flags.DEFINE_string('dataset', None, f'One of {sorted(DATASETS)}.')
  flags.DEFINE_string('out', None, 'Output folder (default: '
                      'workdirs/data/<dataset>).')
  flags.DEFINE_string('source', None, 'Where the recordings come from (see '
                      'the dataset module); default: installed or apt-get.')
  flags.DEFINE_integer('seed', 0, 'Seed of the random choices.')


def main(argv):
  if len(argv) > 1:
    print(f'experiments.data.prepare: error: unexpected arguments: '
          f'{" ".join(argv[1:])}', file=sys.stderr)
    sys.exit(1)
  f = flags.FLAGS
  start = time.time()
  try:
    if f.dataset is None:
      raise ValueError(f'--dataset is required: one of {sorted(DATASETS)}.')
    summary = prepare(f.dataset, f.out, source=f.source, seed=f.seed)
  except (OSError, ValueError, subprocess.SubprocessError) as e:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    print(f'experiments.data.prepare: error: '
          f'{lines[0] if lines else type(e).__name__}', file=sys.stderr)
    sys.exit(1)
  print(json.dumps(summary, indent=1))
  print(f'Prepared {f.dataset} in {time.time() - start:.0f} s.')


if __name__ == '__main__':
  define_flags()
  app.run(main)
