"""Figures of a workdir: training curves and the paper's Fig. 3 (attention).

Shapes: H heads, N latents, M inputs (= gh * gw grid cells, row-major),
X cross-attends, gh x gw the input grid (the image's H x W, or its patch grid
with patch_size > 1).

  curves.png      every scalar of metrics.jsonl against the step; a scalar
                  that never changes (parameter count, batch size) is
                  listed as text instead of drawn.
  attention.png   paper Fig. 3: the pre-softmax cross-attention logits of the
                  first, second and last cross-attend for one evaluation
                  example, each latent's M logits drawn over the input grid
                  (un-permuted for a permuted model), beside the input.

The checkpoint is restored with the runner's one restore function
(checkpointing.restore, parameters and model state only) and the config the
run saved (workdir/config.json).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import textwrap
from typing import Any, Optional, Sequence

from etils import epath
import jax
import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import ml_collections
import numpy as np

from experiments import checkpointing
from experiments import evaluation
from experiments import metric_writers
from experiments import modeling
from experiments import parallel
from experiments import setup
import perceiver

CURVES_NAME = 'curves.png'
ATTENTION_NAME = 'attention.png'
CONFIG_NAME = 'config.json'
PANEL_INCHES = 1.6  # side of one attention map
GAP = 0.3  # width of the gap after the input, in panels
DPI = 100


class FigureError(ValueError):
  """The workdir or its model cannot give the asked-for figure."""


# --------------------------------------------------------------- curves ----


def read_metrics(workdir: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """{name: (steps [T], values [T])} from workdir/metrics.jsonl, by step.

  A step logged twice (a resumed run repeats its restart step) keeps the
  last value; 'nan'/'inf' strings become floats; other strings are skipped.
  """
  path = epath.Path(workdir) / metric_writers.JSONL_NAME
  if not path.exists():
    raise FigureError(f'{path} does not exist: not a workdir of '
                      'experiments.train, or no metrics written yet.')
  by_name: dict[str, dict[int, float]] = {}
  for line in path.read_text().splitlines():
    if not line.strip():
      continue
    record = json.loads(line)
    step = int(record.pop('step'))
    for name, value in record.items():
      try:
        by_name.setdefault(name, {})[step] = float(value)
      except (TypeError, ValueError):
        continue
  if not by_name:
    raise FigureError(f'{path} holds no scalars.')
  return {name: (np.array(sorted(v)), np.array([v[s] for s in sorted(v)]))
          for name, v in sorted(by_name.items())}


def split_curves(series: dict[str, tuple[np.ndarray, np.ndarray]]):
  """(panels {base name: [series names]}, facts {name: value}).

  A scalar whose values are all equal is a fact (see _always_drawn for the
  exceptions). Other scalars get one panel per base name: 'eval/loss' shares
  the panel of the training 'loss'. Panels: loss, evaluation metrics, lr,
  then the rest by name.
  """
  panels: dict[str, list[str]] = {}
  facts: dict[str, float] = {}
  for name, (_, values) in series.items():
    constant = np.all(values == values[0]) or np.all(np.isnan(values))
    if constant and not _always_drawn(name):
      facts[name] = float(values[0])
    else:
      panels.setdefault(name.split('/')[-1], []).append(name)
  def order(base):  # loss, evaluation metrics, lr, the rest
    evaluated = any(n.startswith('eval/') for n in panels[base])
    rank = 0 if base == 'loss' else 1 if evaluated else 2 if base == 'lr' else 3
    return rank, base
  return {base: panels[base] for base in sorted(panels, key=order)}, facts


def _always_drawn(name: str) -> bool:
  """Training loss, learning rate and evaluation metrics (except the example
  count) are drawn even when flat: a stuck top-1 is a finding, not a fact."""
  return name in ('loss', 'lr') or (name.startswith('eval/') and
                                    name != 'eval/num_examples')


def curves_figure(series: dict[str, tuple[np.ndarray, np.ndarray]],
                  title: str = '') -> plt.Figure:
  """One panel per varying scalar (see split_curves), facts as text."""
  panels, facts = split_curves(series)
  if not panels:
    raise FigureError('metrics.jsonl holds no scalar that changes over '
                      'steps: nothing to draw (has the run logged a step?).')
  cols = min(3, len(panels))
  rows = math.ceil(len(panels) / cols)
  fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows + 0.8),
                           dpi=DPI, squeeze=False)
  for ax, (base, names) in zip(axes.flat, panels.items()):
    for name in names:
      steps, values = series[name]
      ax.plot(steps, values, marker='o' if len(steps) < 20 else None,
              markersize=3, label=name)
    ax.set_title(base)
    ax.set_xlabel('step')
    ax.grid(alpha=0.3)
    if len(names) > 1:
      ax.legend(fontsize=8)
  for ax in list(axes.flat)[len(panels):]:
    ax.axis('off')
  text = textwrap.fill(', '.join(f'{k} {_number(v)}' for k, v in facts.items()),
                       40 * cols)
  fig.suptitle(title + ('\n' + text if text else ''), fontsize=9)
  fig.tight_layout()
  return fig


def _number(value: float) -> str:
  return f'{int(value):,}' if float(value).is_integer() else f'{value:.4g}'


def plot_curves(workdir: str) -> str:
  """Draws workdir/curves.png; returns its path."""
  fig = curves_figure(read_metrics(workdir), title=str(workdir))
  return _save(fig, workdir, CURVES_NAME)


# ------------------------------------------------------------ attention ----


def attention_grid(maps: np.ndarray, grid_shape: Sequence[int],
                   permutation: Optional[np.ndarray] = None) -> np.ndarray:
  """One example's attention logits [H, N, M] -> [H, N, gh, gw] on its grid.

  Input m of an unpermuted byte array is grid cell (m // gw, m % gw). The
  preprocessor's permutation puts cell `permutation[m]` at input m (x[:, perm]),
  so logit m belongs to cell permutation[m]: out[..., i, j] is the logit of
  the input that came from cell (i, j), for either kind of model.
  """
  maps = np.asarray(maps)
  gh, gw = grid_shape
  if maps.ndim != 3 or maps.shape[-1] != gh * gw:
    raise ValueError(f'attention maps [H, N, M] with M = {gh}x{gw} = '
                     f'{gh * gw} expected, got shape {maps.shape}.')
  if permutation is not None:
    permutation = np.asarray(permutation)
    if sorted(permutation.tolist()) != list(range(gh * gw)):
      raise ValueError(f'not a permutation of range({gh * gw}).')
    unpermuted = np.empty_like(maps)
    unpermuted[..., permutation] = maps
    maps = unpermuted
  return maps.reshape(maps.shape[:2] + (gh, gw))


def shown_cross_attends(num: int) -> list[int]:
  """Indices of the first, second and last of `num` cross-attends."""
  return sorted({i for i in (0, 1, num - 1) if 0 <= i < num})


def check_attention_config(config: ml_collections.ConfigDict) -> None:
  """FigureError unless the model is a Perceiver over an image grid."""
  if config.model_name not in modeling.ATTENTION_MODELS:
    raise FigureError(f'model {config.model_name!r} has no cross-attention: '
                      f'attention maps need one of '
                      f'{sorted(modeling.ATTENTION_MODELS)}.')
  if config.input_name != 'image':
    raise FigureError(f'input {config.input_name!r} is not an image: '
                      'attention maps are drawn over an image grid only.')


def input_grid(config) -> tuple[tuple[int, int], Optional[np.ndarray]]:
  """((gh, gw), permutation or None) of the config's image preprocessor."""
  height, width = config.input_shape[:2]
  p = config.input.get('patch_size', 1) or 1
  grid = (height // p, width // p)
  seed = config.input.get('permutation_seed', None)
  perm = None if seed is None else perceiver.fixed_permutation(
      grid[0] * grid[1], seed)
  return grid, perm


def attention_maps(model, params, model_state, image: np.ndarray, config
                   ) -> tuple[np.ndarray, list[np.ndarray]]:
  """(logits [K], X grids [H, N, gh, gw]) of one image [H, W, C]."""
  logits, maps = _forward(model)(params, model_state, image[None])
  grid, perm = input_grid(config)
  return (np.asarray(logits[0]),
          [attention_grid(np.asarray(m[0], np.float32), grid, perm)
           for m in maps])


@functools.lru_cache(maxsize=4)
def _forward(model):
  def forward(params, model_state, images):
    (logits, maps), _ = model.apply(params, model_state, None, images,
                                    is_training=False, return_attention=True)
    return logits, maps
  return jax.jit(forward)


def load_config(workdir: str) -> ml_collections.ConfigDict:
  path = epath.Path(workdir) / CONFIG_NAME
  if not path.exists():
    raise FigureError(f'{path} does not exist: not a workdir of '
                      'experiments.train.')
  return ml_collections.ConfigDict(json.loads(path.read_text()))


def restore(config, workdir: str) -> tuple[Any, evaluation.Restored]:
  """(model, parameters and model state of the newest intact checkpoint),
  restored by the runner's one restore function without the optimizer."""
  directory = epath.Path(workdir) / 'checkpoints'
  if not directory.is_dir() or not any(
      p.name.isdigit() for p in directory.iterdir()):
    raise FigureError(f'no checkpoint in {directory}: train first (or wait '
                      'for the first checkpoint_every_steps).')
  model = modeling.build_model(config)
  try:
    restored = evaluation.restore_model(config, model, os.fspath(workdir),
                                        parallel.make_mesh())
  except checkpointing.CheckpointError as e:
    raise FigureError(str(e)) from None
  return model, restored


@contextlib.contextmanager
def _data_errors(config):
  """Missing data or an unknown dataset -> FigureError naming the dataset."""
  try:
    yield
  except (OSError, setup.ConfigError) as e:
    raise FigureError(f'dataset {config.dataset!r}: '
                      f'{str(e).strip().splitlines()[0]}') from e


def eval_example(config, index: int) -> tuple[np.ndarray, Any]:
  """(inputs [H, W, C], label) of example `index` of the evaluation split."""
  seen = 0
  with _data_errors(config):
    dataset = setup.dataset_module(config)
    for batch in dataset.load(config.eval_split,
                              batch_size=int(config.eval_batch_size),
                              is_training=False, seed=config.seed,
                              **config.data.to_dict()):
      valid = int(np.sum(batch['mask']))
      if index < seen + valid:
        return (np.asarray(batch['inputs'][index - seen], np.float32),
                batch['labels'][index - seen])
      seen += valid
  raise FigureError(f'--index={index} is out of range: evaluation split '
                    f'{config.eval_split!r} has {seen} examples.')


def _image_for_display(image: np.ndarray) -> np.ndarray:
  """[H, W, C] normalised inputs -> [H, W] or [H, W, 3] in [0, 1]."""
  x = image[..., 0] if image.shape[-1] == 1 else (
      image[..., :3] if image.shape[-1] >= 3 else image.mean(-1))
  lo, hi = float(x.min()), float(x.max())
  return (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)


def latent_indices(num_latents: int, shown: int) -> list[int]:
  """`shown` latents spread evenly over 0..N-1 (all if N <= shown)."""
  if num_latents <= shown:
    return list(range(num_latents))
  return sorted({int(round(i)) for i in np.linspace(0, num_latents - 1, shown)})


def attention_figure(image: np.ndarray, grids: Sequence[np.ndarray],
                     row_labels: Sequence[str], latents: Sequence[int],
                     title: str = '') -> plt.Figure:
  """The input (left, spanning all rows), then one row per map in `grids`
  ([N, gh, gw] each) with the chosen latents as columns; every map scaled to
  its own min..max (a latent's softmax ignores its logits' offset)."""
  rows, cols = len(grids), len(latents)
  fig = plt.figure(figsize=(PANEL_INCHES * (rows + cols + GAP) + 0.6,
                            PANEL_INCHES * rows + 0.9), dpi=DPI)
  # Column 0 the input, column 1 a gap that holds the row labels.
  spec = fig.add_gridspec(rows, cols + 2,
                          width_ratios=[rows, GAP] + [1] * cols,
                          left=0.02, right=0.99, bottom=0.02,
                          top=1 - 0.9 / (PANEL_INCHES * rows + 0.9),
                          wspace=0.08, hspace=0.25)
  ax = fig.add_subplot(spec[:, 0])
  shown = _image_for_display(image)
  ax.imshow(shown, cmap='gray' if shown.ndim == 2 else None)
  ax.set_title('input', fontsize=9)
  ax.set_xticks([])
  ax.set_yticks([])
  for r, (grid, label) in enumerate(zip(grids, row_labels)):
    for c, n in enumerate(latents):
      ax = fig.add_subplot(spec[r, c + 2])
      ax.imshow(grid[n], cmap='viridis', interpolation='nearest')
      ax.set_xticks([])
      ax.set_yticks([])
      if r == 0:
        ax.set_title(f'latent {n}', fontsize=8)
      if c == 0:
        ax.set_ylabel(label, fontsize=8)
  fig.suptitle(title, fontsize=9)
  return fig


def plot_attention(workdir: str, index: int = 0, num_latents: int = 8) -> str:
  """Draws workdir/attention.png for evaluation example `index`."""
  config = load_config(workdir)
  check_attention_config(config)
  # The chunked cross-attend never holds the logits; the plain one has the
  # same parameters and, for one example, the memory to spare.
  if config.model.get('cross_attend_chunk_size', None) is not None:
    config.model.cross_attend_chunk_size = None
  model, state = restore(config, workdir)
  image, label = eval_example(config, index)
  logits, grids = attention_maps(model, state.params, state.state, image,
                                 config)
  chosen = shown_cross_attends(len(grids))
  rows, labels = [], []
  for x in chosen:
    heads = grids[x]  # [H, N, gh, gw]
    for h in range(heads.shape[0]):
      rows.append(heads[h])
      labels.append(f'cross-attend {x + 1}/{len(grids)}' +
                    (f', head {h}' if heads.shape[0] > 1 else ''))
  grid = grids[0].shape[2:]
  permuted = config.input.get('permutation_seed', None) is not None
  title = (f'{workdir}  step {int(state.step)}  {config.eval_split} example '
           f'{index}  label {_label(label)}  predicted {int(np.argmax(logits))}\n'
           f'pre-softmax cross-attention logits over the {grid[0]}x{grid[1]} '
           f'input grid{" (un-permuted)" if permuted else ""}; each map '
           'scaled to its own range')
  fig = attention_figure(
      image, rows, labels, latent_indices(rows[0].shape[0], num_latents),
      title=title)
  return _save(fig, workdir, ATTENTION_NAME)


def _label(label) -> str:
  label = np.asarray(label)
  return str(int(label)) if label.ndim == 0 else str(np.flatnonzero(label))


def _save(fig: plt.Figure, workdir: str, name: str) -> str:
  path = epath.Path(workdir) / name
  with path.open('wb') as f:
    fig.savefig(f, format='png', dpi=DPI)
  plt.close(fig)
  return os.fspath(path)
