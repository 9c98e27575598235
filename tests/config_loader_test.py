"""experiments.config_loader: the one config loader, with the runner's
override semantics, and one-line errors."""

import pytest

from experiments import config_loader
from experiments import setup
from launch import sweep

FMNIST = 'configs/fashion_mnist.py'


def test_format_value_is_what_config_flags_parses_back():
  assert config_loader.format_value((84, 102)) == '(84,102)'
  assert config_loader.format_value((10,)) == '(10,)'
  assert config_loader.format_value(1e-3) == '0.001'
  assert config_loader.format_value(True) == 'True'
  point = {'optimizer.lr': 1e-3, 'model.share_weights': False,
           'input.max_resolution': (84, 102), 'num_epochs': 2.0}
  config = config_loader.load(FMNIST, point)
  assert config.optimizer.lr == 1e-3 and config.model.share_weights is False
  assert tuple(config.input.max_resolution) == (84, 102)
  assert config.num_epochs == 2.0


def test_loaded_override_equals_the_command_line_one():
  # A sweep's command line and the in-process load read the same overrides.
  point = sweep.load_sweep('configs/imagenet.py', 'cross_attends')[-1]
  args = sweep.train_args('configs/imagenet.py', '/w', point)
  overrides = [a[len('--config.'):].split('=', 1) for a in args
               if a.startswith('--config.')]
  from_args = config_loader.load('configs/imagenet.py', overrides)
  in_process = config_loader.load('configs/imagenet.py', point)
  assert from_args.to_dict() == in_process.to_dict()
  assert in_process.model.num_cross_attends == 8


def test_config_argument_and_override_combine():
  config = config_loader.load(f'{FMNIST}:runlocal', [('model.num_blocks', 3)])
  base = config_loader.load(f'{FMNIST}:runlocal')
  assert config.model.num_blocks == 3 and base.model.num_blocks != 3
  assert config.batch_size == base.batch_size


@pytest.mark.parametrize('spec, overrides, message', [
    ('configs/nope.py', {}, 'config file configs/nope.py does not exist.'),
    (FMNIST, {'optimizer.lrr': 1.0},
     '--config.optimizer.lrr: no such config field. Did you mean '
     '--config.optimizer.lr?'),
    (FMNIST, {'nope.x': 1}, '--config.nope.x: no such config field.'),
    (FMNIST, {'model.num_blocks': 'abc'}, "invalid literal for int()"),
    ('configs/audioset.py:features=bogus', {},
     "features must be 'raw' or 'mel', got 'bogus'."),
])
def test_mistakes_are_one_line_config_errors(spec, overrides, message):
  with pytest.raises(setup.ConfigError) as e:
    config_loader.load(spec, overrides)
  assert message in str(e.value) and '\n' not in str(e.value)


def test_explain_names_the_first_bad_argument_of_a_command_line():
  argv = ['prog', f'--config={FMNIST}', '--config.optimizer.lr=1e-3',
          '--config.optimizer.lrr=1e-3']
  assert config_loader.explain(argv) == (
      '--config.optimizer.lrr: no such config field. Did you mean '
      '--config.optimizer.lr?')
  assert config_loader.explain(argv[:3]) is None
  assert config_loader.explain(argv[:2] + ['--config.modell.x=1']) == (
      '--config.modell.x: no such config field. Did you mean --config.model?')
  assert "could not convert string to float: 'abc'" in config_loader.explain(
      argv[:2] + ['--config.num_epochs=abc'])
  assert config_loader.explain(['prog', '--workdir=/tmp']) is None
