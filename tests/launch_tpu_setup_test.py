"""launch/tpu_setup.sh against a stand-in gcloud that records its calls."""

import os
import stat
import subprocess

from tests import testing

FAKE_GCLOUD = """#!/usr/bin/env bash
printf '%s\\n' "$*" >> "$GCLOUD_LOG"
"""


def test_setup_copies_the_tree_and_installs_on_every_worker(tmp_path):
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  gcloud = bin_dir / 'gcloud'
  gcloud.write_text(FAKE_GCLOUD)
  gcloud.chmod(gcloud.stat().st_mode | stat.S_IEXEC)
  log = tmp_path / 'gcloud.log'
  env = dict(os.environ, PATH=f'{bin_dir}{os.pathsep}{os.environ["PATH"]}',
             GCLOUD_LOG=str(log))
  result = subprocess.run(
      ['bash', 'launch/tpu_setup.sh', 'pod-64', 'us-central2-b', 'my-proj'],
      cwd=testing.ROOT, env=env, capture_output=True, text=True, timeout=60,
      check=False)
  assert result.returncode == 0, result.stderr
  scp, ssh = log.read_text().split('\n', 1)
  assert scp.startswith('compute tpus tpu-vm scp /')
  assert scp.endswith('pod-64:/tmp/perceiver.tar.gz --zone=us-central2-b '
                      '--project=my-proj --worker=all')
  assert ssh.startswith('compute tpus tpu-vm ssh pod-64 --zone=us-central2-b '
                        '--project=my-proj --worker=all --command=set -e')
  assert 'pip install -r requirements.txt' in ssh
  with open(os.path.join(testing.ROOT, 'requirements.txt')) as f:
    jax_pin = [l.strip() for l in f if l.startswith('jax==')][0]
  assert f"pip install 'jax[tpu]=={jax_pin[len('jax=='):]}'" in ssh


def test_setup_needs_a_name_and_zone():
  result = subprocess.run(['bash', 'launch/tpu_setup.sh', 'only-name'],
                          cwd=testing.ROOT, capture_output=True, text=True,
                          timeout=60, check=False)
  assert result.returncode == 2 and 'usage:' in result.stderr
