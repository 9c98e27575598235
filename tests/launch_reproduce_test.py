"""launch.reproduce: commands of a table's cells, the rendered table with
references, and an exit status decided from the results, not the text."""

import json
import os
import subprocess
import sys

import pytest

from launch import reproduce
from launch import tables
from tests import testing


def _half(config):
  """A stand-in reference: its config's batch size, as a fraction."""
  return config.batch_size / 1000


def test_dry_run_lists_one_training_command_per_cell():
  result = reproduce.reproduce(6, scale='local', workdir='/tmp/t6',
                               rows=['2_interleaved', '8_start'],
                               dry_run=True)
  commands = result.text.split('Commands:\n')[1].splitlines()
  assert len(commands) == 2 and result.missing == []
  assert commands[1].endswith(
      '-m experiments.train --config=configs/fashion_mnist.py '
      '--workdir=/tmp/t6/8_start_top1 --config.model.num_blocks=8 '
      '--config.model.num_cross_attends=8 '
      '--config.model.cross_attend_arrangement=start '
      '--config.num_epochs=1.0')  # the ablations' CPU budget
  # Parameters and FLOPs are the paper-size model's (Table 6: 44.9M).
  assert '| 8 at start | 73.7 | — | 44.91M | 710.5 |' in result.text


def test_unknown_rows_and_tables_are_errors():
  with pytest.raises(ValueError, match=r"Table 6 has no rows \['nope'\]"):
    reproduce.reproduce(6, scale='local', workdir=None, rows=['nope'],
                        dry_run=True)
  with pytest.raises(ValueError, match='--table must be one of'):
    reproduce.reproduce(9, scale='local', workdir=None, dry_run=True)


def test_references_are_rendered_in_their_column(monkeypatch):
  table = tables.Table(
      99, 'Test', ('a', 'b'),
      (tables.Row('r', 'Row', (None, None)),),
      local_data='test data',
      references=(tables.Reference(
          'Chance', 'b', 'configs/fashion_mnist.py',
          'tests.launch_reproduce_test._half'),))
  scores = reproduce.reference_scores(table)
  batch = reproduce.config_loader.load('configs/fashion_mnist.py').batch_size
  assert scores == {'Chance': pytest.approx(batch / 10)}
  text = reproduce.markdown(table, table.rows, {}, {}, 'local', scores)
  assert 'CPU-scale stand-ins on test data' in text
  assert f'| Chance | — | — | — | {batch / 10:.1f} | — | — |' in text


def test_every_local_stand_in_config_loads():
  for table in tables.TABLES.values():
    for row in table.rows:
      for run in row.runs:
        if run is not None and run.local_config:
          config = reproduce.config_loader.load(run.local_config,
                                                run.local_overrides)
          assert config.model_name
    for ref in table.references:
      reproduce.config_loader.load(ref.config)


def test_exit_status_follows_missing_results(tmp_path):
  # Table 2's Perceiver row, both cells already scored but one without a
  # result: the command reruns nothing it has, and fails for the missing one.
  root = tmp_path / 't2'
  root.mkdir()
  (root / 'results.json').write_text(json.dumps(
      {'perceiver_raw': 86.0, 'perceiver_permuted': None}))
  env = testing.subprocess_env()
  result = subprocess.run(
      [sys.executable, '-m', 'launch.reproduce', '--table=2', '--rows=perceiver',
       f'--workdir={root}'],
      cwd=testing.ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
  assert "Runs without a result: ['perceiver_permuted']" in result.stdout
  assert '| Perceiver (FF) | 78.0 | 86.0 |' in result.stdout
  assert os.path.exists(root / 'table_2.md')


def test_readings_decide_from_the_scores():
  from launch import report
  table2 = {'resnet50_ff_raw': 88.0, 'resnet50_ff_permuted': 84.0,
            'vit_b16_ff_raw': 85.0, 'vit_b16_ff_permuted': 82.0,
            'transformer_raw': 80.0, 'transformer_permuted': 80.3,
            'perceiver_raw': 86.5, 'perceiver_permuted': 86.2,
            'perceiver_learned_pos_raw': 84.0,
            'perceiver_learned_pos_permuted': 84.1}
  reading, = report.readings(2, table2)
  assert reading.holds is True
  assert 'resnet50_ff -4.0' in reading.line() and '**holds**' in reading.line()
  # One point too few for the ViT, or an invariant model off by 0.6: no.
  assert report.readings(
      2, {**table2, 'vit_b16_ff_permuted': 83.0})[0].holds is False
  assert report.readings(
      2, {**table2, 'perceiver_permuted': 85.9})[0].holds is False
  assert report.readings(
      2, {**table2, 'vit_b16_ff_raw': None})[0].holds is None
  table7 = {'no_sharing_valid': 80.0, 'no_sharing_train': 90.0,
            'sharing_valid': 82.0, 'sharing_train': 85.0}
  assert report.readings(7, table7)[0].holds is True
  assert report.readings(
      7, {**table7, 'sharing_train': 93.0})[0].holds is False
  # A contrast within the float-order noise of two runs is read as neither.
  close, = report.readings(6, {'8_interleaved_top1': 80.6,
                               '8_start_top1': 80.4})
  assert close.holds is None and close.within_noise
  assert '**not resolved' in close.line()
  far, = report.readings(6, {'8_interleaved_top1': 79.6,
                             '8_start_top1': 80.4})
  assert far.holds is False and not far.within_noise
  learn, equal = report.readings(3, {'raw_audio': 40.0, 'mel_audio': 45.0},
                                 {'prior': 20.0})
  assert learn.holds is True and equal.holds is False
  assert 'raw - mel -5.0 points' in equal.line()
  learn, equal = report.readings(3, {'raw_audio': 15.0, 'mel_audio': 16.0},
                                 {'prior': 20.0})
  assert learn.holds is False and equal.holds is True
  generic, pointnet = report.readings(
      4, {'perceiver_top1': 50.0, 'resnet50_ff_top1': 40.0,
          'pointnet2_top1': 30.0})
  assert generic.holds is True and pointnet.holds is False


def test_figure_is_a_png_with_both_panels(tmp_path):
  from launch import report
  table = tables.TABLES[2]
  scores = {reproduce.cell_name(r, c): 80.0 + i
            for i, r in enumerate(table.rows) for c in table.columns}
  path = tmp_path / 'table_2.png'
  report.figure(table, table.rows, scores, str(path), reproduce.cell_name)
  import matplotlib.image
  image = matplotlib.image.imread(str(path))
  assert image.shape[0] > 300 and image.shape[1] > 600
  assert path.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def _fake_training(monkeypatch, fail=()):
  """Replaces training with writing a score: returns the list of commands
  run, in order; each 'run' scores 50 + its position in that list, but the
  jobs named in `fail` exit with status 1 and write nothing."""
  commands = []

  def train_cells(cells, jobs):
    assert len({name for name, _, _ in cells}) == len(cells)  # exit codes by name
    codes = {}
    for name, workdir, command in cells:
      commands.append(command)
      if name in fail:
        codes[name] = 1
        continue
      os.makedirs(workdir, exist_ok=True)
      with open(os.path.join(workdir, 'final_metrics.json'), 'w') as f:
        json.dump({'top1': (50 + len(commands)) / 100,
                   'map': (50 + len(commands)) / 100}, f)
      codes[name] = 0
    return codes

  monkeypatch.setattr(reproduce, 'train_cells', train_cells)
  monkeypatch.setattr(reproduce, 'model_facts',
                      lambda run: {'params': 1e6, 'flops': 1e9})
  monkeypatch.setattr(reproduce, 'reference_scores',
                      lambda table: {r.label: None for r in table.references})
  return commands


def _flag(command, name):
  return next(a.split('=', 1)[1] for a in command
              if a.startswith(f'--{name}='))


def test_all_tables_train_each_experiment_once_in_one_queue(tmp_path,
                                                            monkeypatch):
  commands = _fake_training(monkeypatch)
  root = tmp_path / 'report'
  result = reproduce.reproduce_all(scale='local', workdir=str(root), jobs=2)
  workdirs = [_flag(c, 'workdir') for c in commands]
  # Only the two train-split evaluations of Table 7 reuse a workdir.
  assert len(set(workdirs)) == len(workdirs) - 2
  # The longest runs' table first: the first command trains a Table 4 cell.
  assert f'{root}/table_4/' in workdirs[0]
  # Table 2's Perceiver is also Table 1's Perceiver and Table 7's 'with
  # sharing': trained once, one score in all three tables.
  perceiver = str(root / 'table_2' / 'perceiver_raw')
  assert workdirs.count(perceiver) == 2  # trained, then train-split eval
  assert result.results['table_2/perceiver_raw'] == result.results[
      'table_1/perceiver_top1'] == result.results['table_7/sharing_valid']
  # Its train-split evaluation resumes that run, after every training run.
  train_eval = [c for c in commands if '--config.eval_split=train' in c]
  assert [_flag(c, 'workdir') for c in train_eval] == [
      str(root / 'table_7' / 'no_sharing_valid'), perceiver]
  assert commands.index(train_eval[0]) > max(
      i for i, c in enumerate(commands) if c not in train_eval)
  assert result.missing == []
  report_text = (root / 'REPORT.md').read_text()
  for number in range(1, 8):
    assert f'## Table {number}' in report_text
    assert (root / f'table_{number}' / f'table_{number}.png').exists()
  # A second invocation trains nothing and reports the same scores.
  del commands[:]
  again = reproduce.reproduce_all(scale='local', workdir=str(root), jobs=2)
  assert commands == [] and again.results == result.results


def test_a_failed_run_is_trained_again_by_the_next_invocation(tmp_path,
                                                              monkeypatch):
  failed = 'table_4/pointnet2_top1'
  _fake_training(monkeypatch, fail={failed})
  root = tmp_path / 'report'
  first = reproduce.reproduce_all(scale='local', workdir=str(root), jobs=2)
  assert first.missing == ['table_4/pointnet2_top1']
  retried = _fake_training(monkeypatch)  # the next invocation's succeed
  again = reproduce.reproduce_all(scale='local', workdir=str(root), jobs=2)
  assert [_flag(c, 'workdir') for c in retried] == [
      str(root / 'table_4' / 'pointnet2_top1')]
  assert again.missing == []
  assert again.results['table_4/pointnet2_top1'] is not None
  assert {k: v for k, v in again.results.items() if k != failed} == {
      k: v for k, v in first.results.items() if k != failed}
