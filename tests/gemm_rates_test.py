"""benchmarks/gemm_rates.py on tiny shapes (a smoke test, no timing claims)
and its argument checks."""

import pytest

from benchmarks import gemm_rates
from perceiver.native import library


def test_every_shape_is_timed_for_every_library(capsys):
  gemm_rates.main(['--shapes', '8x4x16:NN', '4x8x16:TN', '--rounds=1',
                   '--seconds=0.001', '--threads=2'])
  lines = capsys.readouterr().out.splitlines()
  names = ['openblas'] + (['mkl'] if library.mkl_path() else [])
  assert lines[0].endswith('libraries: ' + ', '.join(names))
  assert lines[1] == '| m, n, k | form | ' + ' | '.join(
      f'{name} x {t}' for t in (1, 2) for name in names) + ' |'
  rows = lines[3:]
  assert [row.split('|')[1:3] for row in rows] == [
      [' 8, 4, 16 ', ' NN '], [' 4, 8, 16 ', ' TN ']]
  assert all(float(cell) > 0 for row in rows
             for cell in row.split('|')[3:-1])


@pytest.mark.parametrize('argv, message', [
    (['--shapes', '8x4:NN'], 'expected MxNxK:FORM'),
    (['--shapes', '8x4x2:NX'], 'a form of NN, NT, TN or TT'),
    (['--rounds=0'], 'must be positive'),
])
def test_bad_arguments_are_refused(capsys, argv, message):
  with pytest.raises(SystemExit):
    gemm_rates.main(argv)
  assert message in capsys.readouterr().err
