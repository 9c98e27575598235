"""Helpers shared by the config files: the `key=value,...` config argument."""

from __future__ import annotations

import ml_collections


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
