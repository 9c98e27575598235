"""benchmarks/compare_pytorch.py: the run plan, each run's command and malloc
environment, the tables, and that the peer's malloc tunables do what the
project's mallopt calls do. No torch needed: the runs here are fakes."""

import ctypes
import os
import subprocess
import sys
import textwrap

import jax
import pytest

from benchmarks import compare_pytorch as cp
from configs import w1
from experiments import host_memory
from experiments import modeling
from launch import benchmark

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_plan_alternates_the_two_sides_and_swaps_them_every_round():
  runs = cp.plan(3, [32, 64], ['system', 'retain'])
  assert len(runs) == 3 * 2 * 2 * 2
  pairs = [runs[i:i + 2] for i in range(0, len(runs), 2)]
  for a, b in pairs:  # each pair: one cell, both sides, back to back
    assert (a.round, a.side, a.policy) == (b.round, b.side, b.policy)
    first = ('project', 'torch') if a.round % 2 == 0 else ('torch', 'project')
    assert (a.impl, b.impl) == first
  assert [(p[0].side, p[0].policy) for p in pairs[:4]] == [
      (32, 'system'), (32, 'retain'), (64, 'system'), (64, 'retain')]
  assert [p[0].round for p in pairs] == [0] * 4 + [1] * 4 + [2] * 4


def test_retain_tunables_are_host_memorys_mallopt_settings():
  size_max = 2 ** (8 * ctypes.sizeof(ctypes.c_size_t)) - 1  # mallopt's -1
  assert cp.RETAIN_TUNABLES == (
      'glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:'
      f'glibc.malloc.trim_threshold={size_max}')


def test_malloc_env_clears_every_malloc_setting_and_keeps_other_tunables():
  base = {'PATH': '/bin', 'MALLOC_ARENA_MAX': '2',
          'GLIBC_TUNABLES': 'glibc.cpu.x86_shstk=off:glibc.malloc.mmap_max=3'}
  assert cp.malloc_env('system', base) == {
      'PATH': '/bin', 'GLIBC_TUNABLES': 'glibc.cpu.x86_shstk=off'}
  assert cp.malloc_env('system', {'PATH': '/bin'}) == {'PATH': '/bin'}
  assert cp.malloc_env('retain', base)['GLIBC_TUNABLES'] == (
      'glibc.cpu.x86_shstk=off:' + cp.RETAIN_TUNABLES)
  assert cp.malloc_env('retain', {})['GLIBC_TUNABLES'] == cp.RETAIN_TUNABLES
  with pytest.raises(ValueError, match='Unknown policy'):
    cp.malloc_env('auto', base)


@pytest.mark.parametrize('policy,impl,project_retain,mode,tunables', [
    ('system', 'project', 'mallopt', 'system', None),
    ('retain', 'project', 'mallopt', 'retain', None),
    ('retain', 'project', 'tunables', 'system', cp.RETAIN_TUNABLES),
    ('system', 'torch', 'mallopt', None, None),
    ('retain', 'torch', 'mallopt', None, cp.RETAIN_TUNABLES),
])
def test_each_run_gets_its_policys_malloc_settings(policy, impl,
                                                    project_retain, mode,
                                                    tunables):
  base = {'PATH': '/bin', 'GLIBC_TUNABLES': 'glibc.malloc.arena_max=4'}
  argv, env = cp.launch(
      cp.Run(0, 128, policy, impl), workload='W2', batch_size=4,
      iterations=3, warmup=2, torch_python='/peer/python', torch_threads=2,
      project_retain=project_retain, base_env=base)
  assert env.get('GLIBC_TUNABLES') == tunables
  assert '--iterations=3' in argv and '--warmup=2' in argv
  if impl == 'project':
    assert argv[:3] == [sys.executable, '-m', 'benchmarks.compare_pytorch']
    assert '--worker=W2:side=128' in argv
    assert f'--host_memory={mode}' in argv
    assert env['JAX_PLATFORMS'] == 'cpu'
  else:
    assert argv[:2] == ['/peer/python', cp.PEER_SCRIPT]
    assert {'--json', '--forward', '--side=128', '--batch_size=4',
            '--threads=2'} <= set(argv)


def _fake_runner(times):
  """A runner whose runs take times[(impl, policy)] (train; forward = half)."""
  def run(argv, env):
    impl = 'project' if 'benchmarks.compare_pytorch' in argv else 'torch'
    policy = 'retain' if ('--host_memory=retain' in argv or
                          'GLIBC_TUNABLES' in env) else 'system'
    t = times[(impl, policy)]
    return {'params': w1.NUM_PARAMS, 'train_s': [t, t + 1.0, t - 0.1],
            'forward_s': [t / 2], 'maxrss_gib': 2.0 if impl == 'torch' else 4.0,
            'wall_s': 10.0, 'versions': impl}
  return run


def test_results_table_gives_medians_and_torch_over_project():
  times = {('project', 'system'): 3.0, ('torch', 'system'): 3.3,
           ('project', 'retain'): 2.0, ('torch', 'retain'): 3.0}
  runs = cp.plan(2, [32], ['system', 'retain'])
  command = lambda run: cp.launch(
      run, workload='W2', batch_size=4, iterations=3, warmup=1,
      torch_python='/peer/python', torch_threads=2, base_env={})
  logged = []
  results = cp.run_plan(runs, command, _fake_runner(times),
                        expected_params=w1.NUM_PARAMS, log=logged.append)
  assert len(results) == len(logged) == 8
  assert logged[0].startswith('[1/8] round 0 S=32 system project: train '
                              'step 3.000, forward 1.500, peak RSS 4.00')
  summary = cp.summarize(results)
  assert summary[(32, 'retain', 'project')] == {
      'runs': 2, 'train_s': 2.0, 'forward_s': 1.0, 'maxrss_gib': 4.0}
  table = cp.format_summary(summary, [32], ['system', 'retain'])
  lines = table.splitlines()
  assert lines[0] == ('| S | M | measure | malloc defaults: project | torch | '
                      'torch / project | freed memory retained: project | '
                      'torch | torch / project |')
  assert lines[2] == ('| 32 | 1,024 | train step (s) | 3.000 | 3.300 | 1.10 '
                      '| 2.000 | 3.000 | 1.50 |')
  assert lines[4] == ('| 32 | 1,024 | peak RSS (GiB) | 4.00 | 2.00 | 0.50 '
                      '| 4.00 | 2.00 | 0.50 |')
  runs_table = cp.format_runs(results)
  assert len(runs_table.splitlines()) == 2 + 8
  assert '| 2 | 0 | 32 | system | torch | 3.300 | 1.650 | 2.00 | - | 10 |' in (
      runs_table)


def test_a_failed_run_is_reported_and_a_wrong_model_stops_the_plan():
  runs = cp.plan(1, [32], ['system'])
  command = lambda run: cp.Launch([run.impl], {})
  failed = cp.run_plan(runs, command,
                       lambda argv, env: {'error': 'exit 1: boom',
                                          'wall_s': 1.0}, log=lambda s: None)
  assert cp.summarize(failed) == {}
  assert '| - | - | - |' in cp.format_summary({}, [32], ['system'])
  assert 'exit 1: boom' in cp.format_runs(failed)
  with pytest.raises(RuntimeError, match='7,656,116 parameters'):
    cp.run_plan(runs, command,
                lambda argv, env: {'params': w1.NUM_PARAMS + 1, 'wall_s': 1.0},
                expected_params=w1.NUM_PARAMS, log=lambda s: None)


def test_execute_reads_the_last_json_line_and_the_childs_peak_memory():
  result = cp.execute([sys.executable, '-c',
                       'print("noise"); print(\'{"a": 1}\'); '
                       'x = bytearray(64 * 2**20)'], dict(os.environ))
  assert result['a'] == 1 and 'error' not in result
  assert result['maxrss_gib'] > 60 / 1024
  failed = cp.execute([sys.executable, '-c', 'raise SystemExit("bad")'],
                      dict(os.environ))
  assert failed['error'] == 'exit 1: bad'


def test_w2_preset_is_w1s_model_at_batch_4_over_s_by_s_images():
  config, batch = benchmark.workload('W1')
  assert (batch, tuple(config.input_shape)) == (16, (64, 64, 3))
  assert tuple(config.input.max_resolution) == (64, 64)
  for side in (32, 256):
    config, batch = benchmark.workload(f'W2:side={side}')
    assert (batch, tuple(config.input_shape)) == (4, (side, side, 3))
    assert tuple(config.input.max_resolution) == (side, side)
    assert config.input.num_bands == 32
    params = modeling.param_shapes(config)
    assert sum(x.size for x in jax.tree.leaves(params)) == w1.NUM_PARAMS
  with pytest.raises(ValueError, match='W2 needs an image side'):
    benchmark.workload('W2')
  with pytest.raises(ValueError, match='Unknown config argument'):
    benchmark.workload('W1:side=32')
  with pytest.raises(ValueError, match='Unknown --workload'):
    benchmark.workload('W3')


def test_a_config_file_or_else_the_workload():
  # The benchmark scripts' --config (at its own batch size) over --workload.
  config, batch, name = benchmark.config_or_workload(
      'configs/w1.py:side=32,batch_size=2', 'W1')
  assert (batch, tuple(config.input_shape), name) == (
      2, (32, 32, 3), 'configs/w1.py:side=32,batch_size=2')
  config, batch, name = benchmark.config_or_workload(None, 'W2:side=64')
  assert (batch, tuple(config.input_shape), name) == (4, (64, 64, 3),
                                                      'W2:side=64')
  with pytest.raises(ValueError, match='Unknown --workload'):
    benchmark.config_or_workload(None, 'W3')
  with pytest.raises(ValueError):
    benchmark.config_or_workload('configs/no_such_config.py', 'W1')


# With argument 'mallopt' first retains freed memory as the project does, then
# allocates, touches and frees a 64 MiB block 3 times, counting the minor page
# faults of the last 2 (every page again when malloc returns freed memory to
# the kernel), then starts 4 threads that malloc at once and counts the heaps
# (arenas) that malloc_info lists before and after.
_PROGRAM = textwrap.dedent('''
    import ctypes, resource, sys, tempfile, threading
    if sys.argv[1] == 'mallopt':  # the project's own call (imports JAX)
      from experiments import host_memory
      assert host_memory.configure('retain')
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.fopen.restype = ctypes.c_void_p
    libc.fopen.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
    libc.fclose.argtypes = [ctypes.c_void_p]
    faults = []
    for _ in range(3):
      before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      block = libc.malloc(2**26)
      ctypes.memset(block, 1, 2**26)
      libc.free(block)
      faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)

    def heaps():
      with tempfile.NamedTemporaryFile('r') as f:
        fp = libc.fopen(f.name.encode(), b'w')
        libc.malloc_info(0, fp)
        libc.fclose(fp)
        return f.read().count('<heap nr=')

    start = heaps()
    barrier = threading.Barrier(5)
    def work():
      libc.free(libc.malloc(4096))
      barrier.wait()
    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
      t.start()
    barrier.wait()
    new = heaps() - start
    for t in threads:
      t.join()
    print(sum(faults[1:]), new)
''')


def _malloc_behaviour(how, env_policy):
  env = cp.malloc_env(env_policy, dict(os.environ, JAX_PLATFORMS='cpu',
                                       PYTHONPATH=_ROOT))
  out = subprocess.run([sys.executable, '-c', _PROGRAM, how], env=env,
                       capture_output=True, text=True, timeout=120, check=True)
  faults, new_heaps = out.stdout.split()
  return int(faults), int(new_heaps)


@pytest.mark.skipif(host_memory._glibc() is None, reason='needs glibc')
def test_the_peers_tunables_retain_memory_as_the_projects_mallopt_does():
  pages = 2 * 2**26 // os.sysconf('SC_PAGE_SIZE')
  faults, new_heaps = _malloc_behaviour('defaults', 'system')
  assert faults > 0.9 * pages and new_heaps >= 1
  for how, env_policy in (('mallopt', 'system'),  # the project
                          ('defaults', 'retain')):  # the peer: GLIBC_TUNABLES
    faults, new_heaps = _malloc_behaviour(how, env_policy)
    assert faults < 0.05 * pages, (how, env_policy)
    assert new_heaps == 0, (how, env_policy)
