"""Helpers shared by the config files: the `key=value,...` config argument."""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict


def _convert(key: str, text: str, default):
  if isinstance(default, bool):
    if text.lower() in ('true', '1', 'yes', ''):
      return True
    if text.lower() in ('false', '0', 'no'):
      return False
    raise ValueError(f'Config argument {key}={text!r}: expected a boolean.')
  if default is None:
    return None if text.lower() == 'none' else text
  try:
    return type(default)(text)
  except ValueError:
    raise ValueError(f'Config argument {key}={text!r}: expected a '
                     f'{type(default).__name__}.') from None


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses 'runlocal' or 'key=value,key2=value2' against typed defaults.

  A bare key (`runlocal`) sets a boolean to True. Unknown keys are an error
  that lists the valid ones.
  """
  values = dict(defaults)
  for item in filter(None, (arg or '').split(',')):
    key, _, text = item.partition('=')
    key = key.strip()
    if key not in defaults:
      raise ValueError(f'Unknown config argument {key!r}; valid arguments: '
                       f'{sorted(defaults)}.')
    values[key] = _convert(key, text.strip(), defaults[key])
  return ml_collections.ConfigDict(values)


def use_synthetic_data(config: ml_collections.ConfigDict, *,
                       num_train_examples: int = 512,
                       num_eval_examples: int = 100, **extra) -> None:
  """Switches a config to made-up data of its own input shape and classes
  (experiments/data/synthetic.py), e.g. for tests and benchmarks."""
  config.dataset = 'synthetic'
  config.data = dict(data_dir=config_dict.placeholder(str),
                     input_shape=config.input_shape,
                     num_classes=config.model.num_classes,
                     num_train_examples=num_train_examples,
                     num_eval_examples=num_eval_examples, **extra)
