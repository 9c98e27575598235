"""Every config builds and summarises; the CLI prints the paper's figures."""

import importlib
import json
import os
import subprocess
import sys

import pytest

from experiments.tools import model_summary as summary

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_ARGS = {
    'imagenet': ['', 'runlocal', 'permuted'],
    'modelnet40': ['', 'runlocal'],
    'fashion_mnist': ['', 'permuted', 'runlocal'],
    'audioset': ['modality=audio,features=raw', 'modality=audio,features=mel',
                 'modality=video', 'modality=audio_video,features=raw',
                 'modality=audio_video,features=mel', 'runlocal',
                 'modality=audio_video,runlocal'],
}


@pytest.mark.parametrize('name,arg', [(n, a) for n, args in CONFIG_ARGS.items()
                                      for a in args])
def test_every_config_summarises(name, arg):
  config = importlib.import_module(f'configs.{name}').get_config(arg or None)
  s = summary.summarize(config)
  assert s['params'] == sum(m['params'] for m in s['modules'].values())
  assert s['flops'] == sum(m['flops'] for m in s['modules'].values()) > 0
  if 'runlocal' in arg:
    assert s['params'] < 1e6 and s['flops'] < 1e9
  elif name == 'fashion_mnist':  # CPU-scale by design (the README's main job)
    assert s['params'] == 83_596
  else:  # the paper's model sizes
    assert s['params'] > 1e7
  assert 'perceiver/head' in s['modules']
  assert summary.format_summary(s).count('\n') >= 4


def test_cli_json_reports_paper_figures_and_applies_overrides():
  run = lambda *args: subprocess.run(
      [sys.executable, '-m', 'launch.summary', *args], cwd=ROOT,
      capture_output=True, text=True, timeout=300,
      env=dict(os.environ, JAX_PLATFORMS='cpu'))
  out = run('--config=configs/imagenet.py', '--json')
  assert out.returncode == 0, out.stderr[-2000:]
  s = json.loads(out.stdout.strip().splitlines()[-1])
  assert abs(s['params'] - 44.9e6) / 44.9e6 < 1e-3
  assert abs(s['flops'] - 707.2e9) / 707.2e9 < 0.01
  out = run('--config=configs/imagenet.py', '--json',
            '--config.model.num_blocks=1')
  fewer = json.loads(out.stdout.strip().splitlines()[-1])
  assert fewer['params'] < s['params'] and fewer['flops'] < s['flops'] / 4
