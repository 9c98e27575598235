"""Each table's finding, read from this run's scores, and its figure.

A finding is the paper's qualitative claim for a table (launch/tables.py),
checked on the scores of a reproduction: `readings(number, scores, refs)`
says for each of the table's findings whether it holds at this scale and by
how much, in one line. The
thresholds are the paper's own contrasts, fixed here for every scale:

  Table 2  models with a locality prior (ResNet, ViT) lose at least 2.5
           points under the permutation; the others stay within 0.5.
  Table 3  raw audio and mel spectrograms within 2 points of mAP.
  Tables 5-7  a contrast between two rows counts only beyond NOISE (0.5
           points, the float-order noise of one model's two runs); within
           it the reading says 'not resolved'.

`figure` draws a table as grouped bars (this run per column) beside the
paper's numbers, as a PNG.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

from launch import tables as tables_lib

Scores = dict[str, Optional[float]]  # cell name -> score in percent


@dataclasses.dataclass(frozen=True)
class Reading:
  claim: str  # the paper's finding
  holds: Optional[bool]  # None: not measured, or within the noise
  detail: str  # this run's figures behind the verdict
  within_noise: bool = False  # the contrast is smaller than NOISE

  def line(self) -> str:
    verdict = ('not resolved (within the run-to-run noise)'
               if self.within_noise else
               {True: 'holds', False: 'does not hold',
                None: 'not measured'}[self.holds])
    return f'{self.claim}: **{verdict}** at this scale ({self.detail}).'


# Points within which two runs of one CPU-scale model differ by float32
# summation order alone (Table 2's invariant models: raw vs permuted differ
# by up to 0.3 in the README's run): a contrast smaller than this between
# two rows of an ablation (Tables 5-7) is not read as a finding either way.
NOISE = 0.5


def _contrast(claim: str, margin: float, detail: str) -> Reading:
  """A finding that holds when `margin` > 0, read only beyond NOISE."""
  if abs(margin) <= NOISE:
    return Reading(claim, None, detail, within_noise=True)
  return Reading(claim, margin > 0, detail)


def _get(scores: Scores, *names: str) -> Optional[list[float]]:
  values = [scores.get(n) for n in names]
  return None if any(v is None for v in values) else values


def _fmt(v: float) -> str:
  return f'{v:+.1f}'


def _table1(s: Scores, refs: Scores) -> Reading:
  claim = ('The Perceiver (FF) matches or beats the baselines given the same '
           'Fourier features (paper: 78.0 vs 73.5 / 76.7 / 57.0)')
  names = ['resnet50_ff_top1', 'vit_b16_ff_top1', 'transformer_top1']
  got = _get(s, 'perceiver_top1', *names)
  if got is None:
    return Reading(claim, None, 'scores missing')
  best = max(got[1:])
  return Reading(claim, got[0] >= best,
                 f'Perceiver {got[0]:.1f}, best FF baseline {best:.1f}, '
                 f'margin {_fmt(got[0] - best)}')


LOCALITY_DROP = 2.5  # points a locality-prior model must lose (Table 2)
INVARIANT_BAND = 0.5  # points within which the others must stay


def _table2(s: Scores, refs: Scores) -> Reading:
  claim = ('Permuting the pixels hurts the models with a locality prior '
           f'(ResNet, ViT: >= {LOCALITY_DROP} points lost) and not the others '
           f'(within {INVARIANT_BAND})')
  local = ('resnet50_ff', 'vit_b16_ff')
  other = ('transformer', 'perceiver', 'perceiver_learned_pos')
  changes, holds = [], True
  for name in local + other:
    got = _get(s, f'{name}_raw', f'{name}_permuted')
    if got is None:
      changes.append(f'{name} not measured')
      holds = None if holds is not False else False
      continue
    change = got[1] - got[0]
    changes.append(f'{name} {_fmt(change)}')
    ok = (change <= -LOCALITY_DROP if name in local
          else abs(change) <= INVARIANT_BAND)
    if not ok:
      holds = False
  return Reading(claim, holds, 'permuted - raw: ' + ', '.join(changes))


RAW_MEL_BAND = 2.0  # points of mAP within which raw and mel count as equal


def _table3(s: Scores, refs: Scores) -> list[Reading]:
  learn = ('The Perceiver learns audio far above chance from raw samples and '
           'from mel spectrograms alike')
  equal = ('Raw audio does about as well as mel spectrograms (paper: 38.3 vs '
           f'38.4 mAP; here: within {RAW_MEL_BAND:.0f} points)')
  got = _get(s, 'raw_audio', 'mel_audio')
  prior = next(iter(refs.values()), None) if refs else None
  if got is None or prior is None:
    return [Reading(learn, None, 'scores missing'),
            Reading(equal, None, 'scores missing')]
  raw, mel = got
  return [Reading(learn, min(raw, mel) > prior,
                  f'raw {raw:.1f}, mel {mel:.1f} mAP, class prior '
                  f'{prior:.1f}'),
          Reading(equal, abs(raw - mel) <= RAW_MEL_BAND,
                  f'raw - mel {_fmt(raw - mel)} points')]


def _table4(s: Scores, refs: Scores) -> list[Reading]:
  generic = ('On point clouds the Perceiver beats the grid-based baselines '
             '(ResNet, ViT, Transformer; paper: 85.7 vs at most 82.1)')
  pointnet_claim = ('PointNet++, built around 3-D neighbourhoods, stays ahead '
                    'of the Perceiver (paper: 91.9 vs 85.7)')
  grid = [n for n in ('resnet50_ff_top1', 'vit_b4_top1', 'transformer_top1')
          if s.get(n) is not None]
  perceiver, pointnet = s.get('perceiver_top1'), s.get('pointnet2_top1')
  majority = next(iter(refs.values()), None) if refs else None
  readings = []
  if perceiver is None or not grid:
    readings.append(Reading(generic, None, 'scores missing'))
  else:
    best = max(s[n] for n in grid)
    detail = (f'Perceiver {perceiver:.1f}, best grid baseline {best:.1f} '
              f'({_fmt(perceiver - best)})')
    if majority is not None:
      detail += f', majority class {majority:.1f}'
    readings.append(Reading(generic, perceiver > best, detail))
  if perceiver is None or pointnet is None:
    readings.append(Reading(pointnet_claim, None, 'scores missing'))
  else:
    readings.append(Reading(pointnet_claim, pointnet > perceiver,
                            f'PointNet++ {pointnet:.1f}, Perceiver '
                            f'{perceiver:.1f}'))
  return readings


def _table5(s: Scores, refs: Scores) -> Reading:
  claim = ('Without a latent Transformer, more cross-attends help '
           '(paper: 4 -> 39.4, 8 -> 45.3)')
  got = _get(s, '4_cross_attends_top1', '8_cross_attends_top1')
  if got is None:
    return Reading(claim, None, 'scores missing')
  return _contrast(claim, got[1] - got[0],
                   f'4: {got[0]:.1f}, 8: {got[1]:.1f} '
                   f'({_fmt(got[1] - got[0])})')


def _table6(s: Scores, refs: Scores) -> Reading:
  claim = ('Interleaving the cross-attends beats putting them all at the '
           'start (paper, 8 cross-attends: 78.0 vs 73.7)')
  counts = [c for c in (2, 4, 8)
            if _get(s, f'{c}_interleaved_top1', f'{c}_start_top1')]
  if not counts:
    return Reading(claim, None, 'scores missing')
  c = max(counts)
  inter, start = _get(s, f'{c}_interleaved_top1', f'{c}_start_top1')
  return _contrast(claim, inter - start,
                   f'{c} cross-attends: interleaved {inter:.1f}, at start '
                   f'{start:.1f} ({_fmt(inter - start)})')


def _table7(s: Scores, refs: Scores) -> Reading:
  claim = ('Sharing weights reduces overfitting: the train - valid gap is '
           'larger without sharing (paper: 14.8 vs 1.5 points)')
  got = _get(s, 'no_sharing_valid', 'no_sharing_train', 'sharing_valid',
             'sharing_train')
  if got is None:
    return Reading(claim, None, 'scores missing')
  gap_no, gap_yes = got[1] - got[0], got[3] - got[2]
  return _contrast(claim, gap_no - gap_yes,
                   f'gap without sharing {gap_no:.1f}, with sharing '
                   f'{gap_yes:.1f}')


READINGS: dict[int, Callable[[Scores, Scores], Any]] = {
    1: _table1, 2: _table2, 3: _table3, 4: _table4, 5: _table5, 6: _table6,
    7: _table7}


def readings(number: int, scores: Scores, refs: Optional[Scores] = None
             ) -> list[Reading]:
  """The table's findings (one or two), each read from the scores."""
  got = READINGS[number](scores, refs or {})
  return got if isinstance(got, list) else [got]


def figure(table: tables_lib.Table, rows, scores: Scores, path: str,
           cell_name: Callable[[tables_lib.Row, str], str]) -> None:
  """Grouped bars, one group per row and one bar per column: this run
  (left panel) and the paper (right panel), saved as a PNG at `path`."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  labels = [row.label for row in rows]
  width = 0.8 / len(table.columns)
  x = np.arange(len(rows))
  fig, axes = plt.subplots(1, 2, figsize=(3 + 1.6 * len(rows), 4.2),
                           sharey=False)
  for ax, title, value in (
      (axes[0], f'this run: {table.local_data}' if table.local_data
       else 'this run', lambda row, c, run: scores.get(cell_name(row, c))),
      (axes[1], 'paper', lambda row, c, run: run.paper)):
    for i, column in enumerate(table.columns):
      heights = []
      for row in rows:
        run = row.runs[i]
        v = None if run is None else value(row, column, run)
        heights.append(np.nan if v is None else v)
      bars = ax.bar(x + (i - (len(table.columns) - 1) / 2) * width, heights,
                    width, label=column)
      ax.bar_label(bars, fmt='%.1f', fontsize=7, padding=1)
    ax.set_title(title, fontsize=9)
    ax.set_xticks(x, labels, rotation=25, ha='right', fontsize=8)
    paper_label = (table.title.split(',')[-1].strip() if ',' in table.title
                   else table.title)
    # The local panel's scores are not ImageNet's (or AudioSet's ...).
    ax.set_ylabel(paper_label if title == 'paper' else 'this run (%)',
                  fontsize=8)
    if len(table.columns) > 1:
      ax.legend(fontsize=8)
  fig.suptitle(f'Table {table.number}: {table.title}', fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
