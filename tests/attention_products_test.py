"""benchmarks/attention_products.py on tiny shapes (a smoke test, no timing
claims) and its argument checks."""

import pytest

from benchmarks import attention_products


@pytest.mark.parametrize('impl', ['jax', 'native'])
def test_every_product_and_the_matmul_are_timed(capsys, impl):
  attention_products.main(['--small', '--iterations=1', '--rounds=1',
                           '--matmul_n=32', f'--impl={impl}'])
  lines = capsys.readouterr().out.splitlines()
  rows = [line for line in lines[3:] if line.startswith('|')]
  forms = [row.split('|')[2].strip() for row in rows]
  assert forms == ['NT', 'NN', 'TN'] * 2 + ['matmul']
  assert all(float(row.split('|')[3]) > 0 for row in rows)  # ms


def test_non_positive_counts_are_refused(capsys):
  with pytest.raises(SystemExit):
    attention_products.main(['--iterations=0'])
  assert 'must be positive' in capsys.readouterr().err
