"""The one way configs are loaded: `configs/NAME.py[:ARG]` plus overrides.

Every entry point reads configs through this module, so that an override
means the same thing everywhere:

  experiments.train, launch.summary, launch.benchmark   define_flag()
  launch.reproduce, launch.sweep (in-process)           load(spec, overrides)
  launch.sweep, launch.reproduce (command lines)        override_args(...)

`load` parses its overrides with ml_collections' config_flags, the parser
behind `--config.KEY=VALUE` on the command line, and `override_args` writes
values in the form that parser reads back, so a sweep point or table cell
loaded in-process is the config its training command trains.

Mistakes (a missing file, a field the config does not have, a value of the
wrong type, a bad config argument) are `setup.ConfigError`s of one line.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
from typing import Any, Iterable, Mapping, Optional, Union

from absl import flags
import ml_collections
from ml_collections import config_flags

from experiments import setup

Overrides = Union[Mapping[str, Any], Iterable[tuple[str, Any]]]


def define_flag(name: str = 'config',
                flag_values: flags.FlagValues = flags.FLAGS,
                sys_argv: Optional[list[str]] = None):
  """`--config=configs/NAME.py[:ARG]` with `--config.KEY=VALUE` overrides;
  the config is locked, so a misspelt field fails instead of being added.
  `sys_argv`: the arguments config_flags reads the overrides from (default:
  sys.argv, the program's command line)."""
  return config_flags.DEFINE_config_file(
      name, None, 'Experiment config: configs/NAME.py[:ARG].',
      flag_values=flag_values, lock_config=True, sys_argv=sys_argv)


def format_value(value: Any) -> str:
  """A Python value as config_flags parses it back from the command line."""
  if isinstance(value, (tuple, list)):
    return '(' + ','.join(format_value(v) for v in value) + (
        ',)' if len(value) == 1 else ')')
  return repr(value) if isinstance(value, float) else str(value)


def override_args(overrides: Overrides, name: str = 'config') -> list[str]:
  """['--config.KEY=VALUE', ...] for a command line."""
  items = overrides.items() if isinstance(overrides, Mapping) else overrides
  return [f'--{name}.{k}={format_value(v)}' for k, v in items]


def config_path(spec: str) -> str:
  """The file of a spec 'configs/NAME.py[:ARG]', checked to exist."""
  path = spec.split(':', 1)[0]
  if not os.path.isfile(path):
    raise setup.ConfigError(f'config file {path} does not exist.')
  return path


def load_module(spec: str):
  """The config file as a module (for its sweep generators)."""
  path = config_path(spec)
  module_spec = importlib.util.spec_from_file_location(
      'config_' + os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module


def _field_error(config: ml_collections.ConfigDict, key: str):
  """A ConfigError for an override key, or None if the config has it."""
  node, path = config, []
  for part in key.split('.'):
    if not isinstance(node, (ml_collections.ConfigDict, dict)) or (
        part not in node):
      known = list(node.keys()) if isinstance(
          node, (ml_collections.ConfigDict, dict)) else []
      close = difflib.get_close_matches(part, known, n=1)
      hint = (f' Did you mean --config.{".".join(path + close)}?'
              if close else '')
      return setup.ConfigError(f'--config.{key}: no such config field.{hint}')
    node, path = node[part], path + [part]
  return None


def _parse(spec: str, args: list[str]) -> ml_collections.ConfigDict:
  argv = ['config_loader', f'--config={spec}', *args]
  flag_values = flags.FlagValues()
  define_flag(flag_values=flag_values, sys_argv=argv)
  try:
    flag_values(argv)
    config = flag_values.config
    config.keys()  # config_flags loads the file lazily: fail here.
  except setup.ConfigError:
    raise
  except (flags.Error, ValueError, TypeError, KeyError, AttributeError,
          OSError) as e:
    raise setup.ConfigError(f'{spec}: {setup.one_line(str(e))}') from None
  return config


def load(spec: str, overrides: Overrides = ()) -> ml_collections.ConfigDict:
  """`configs/NAME.py[:ARG]` with dotted-key overrides, parsed exactly as
  `--config.KEY=VALUE` on the runner's command line."""
  config_path(spec)
  return _load_args(spec, override_args(overrides))


def _load_args(spec: str, args: list[str]) -> ml_collections.ConfigDict:
  if args:
    base = _parse(spec, [])
    for arg in args:
      error = _field_error(base, arg[len('--config.'):].split('=', 1)[0])
      if error:
        raise error
  return _parse(spec, args)


def explain(argv: list[str]) -> Optional[str]:
  """Why a command line's `--config=...` and `--config.KEY=VALUE` arguments
  do not load, in one line; None if they do (or name no config)."""
  spec = next((a.split('=', 1)[1] for a in argv
               if a.startswith('--config=')), None)
  if spec is None:
    return None
  try:
    _load_args(spec, [a for a in argv if a.startswith('--config.')])
  except setup.ConfigError as e:
    return str(e)
  return None
