"""Two local CPU processes training one run data-parallel (`--distributed`, loopback coordinator, gloo).

Checks, against a one-process run of the same command: the same records (masks
exactly, numbers to float rounding: each step's gradient is all-reduced over the
two processes' halves of the batch), and the same saved θ of every cycle (the default --save_params:
each save is one every process takes part in, process 0 writing); process 1 writes nothing (a Python audit
hook in process 1 logs every file it opens for writing or creates, renames or
deletes under --out); and a run whose two processes are SIGKILLed mid-run
resumes, when both are started again, to the same records.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ['--dataset=digits', '--widths=8,8', '--metrics=min', '--max_epochs=2', '--floor=0.7',
        '--checkpoint_every_epochs=1']  # the default --save_params: each cycle's θ saved (process 0 writes)
TIMEOUT = 150  # seconds any one run may take (bounded waits: a hung collective fails the test)

# Process 1's write log: every open for writing, mkdir, rename or removal under WATCH.
AUDIT_HOOK = textwrap.dedent('''
    import os, sys
    _watch, _log = os.environ['DN_WATCH'], os.environ['DN_WRITE_LOG']
    def _hook(event, args):
      path = None
      if event == 'open' and args and isinstance(args[0], (str, bytes)):
        mode, flags = args[1], args[2] if len(args) > 2 else 0
        if (isinstance(mode, str) and any(c in mode for c in 'wax+')) or (flags or 0) & (os.O_WRONLY | os.O_RDWR):
          path = args[0]
      elif event == 'os.mkdir' and not os.path.exists(args[0]):  # makedirs(exist_ok) of an existing one: a no-op
        path = args[0]
      elif event in ('os.rename', 'os.remove', 'os.rmdir', 'shutil.rmtree', 'os.replace'):
        path = args[0]
      if path is not None:
        path = os.path.abspath(os.fsdecode(path))
        if path == _watch or path.startswith(_watch + os.sep):
          with open(_log + '.raw', 'a') as f:  # outside _watch: not logged again
            f.write(f'{event} {path}\\n')
    sys.addaudithook(_hook)
''')


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'PYTHONPATH': ROOT}
  env.pop('XLA_FLAGS', None)  # one CPU device per process
  return {**env, **(extra or {})}


def _command(out: str, *extra: str) -> list[str]:
  return [sys.executable, '-m', 'experiments.dropnet', *ARGS, f'--out={out}', *extra]


def _start_pair(out: str, tmp_path, hook_dir: str | None = None, args: tuple[str, ...] = ()
                ) -> list[subprocess.Popen]:
  port = _free_port()
  procs = []
  for i in range(2):
    extra = {}
    if i == 1 and hook_dir is not None:
      extra = {'PYTHONPATH': f'{hook_dir}{os.pathsep}{ROOT}', 'DN_WATCH': os.path.abspath(out),
               'DN_WRITE_LOG': str(tmp_path / 'writes1')}
    log = open(tmp_path / f'log{i}-{port}', 'w')
    procs.append(subprocess.Popen(
        _command(out, *args, '--distributed', f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2',
                 f'--process_id={i}'), cwd=ROOT, env=_env(extra), stdout=log, stderr=subprocess.STDOUT))
  return procs


def _wait(procs: list[subprocess.Popen], tmp_path) -> None:
  deadline = time.monotonic() + TIMEOUT
  try:
    for p in procs:
      p.wait(timeout=max(1.0, deadline - time.monotonic()))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  logs = '\n'.join(f.read_text()[-3000:] for f in sorted(tmp_path.glob('log*')))
  if any(p.returncode for p in procs):
    if 'gloo' in logs.lower() and 'not' in logs.lower() and 'support' in logs.lower():
      pytest.skip('this jaxlib cannot run CPU multi-process collectives (gloo): ' + logs[-500:])
    raise AssertionError(f'return codes {[p.returncode for p in procs]}:\n{logs}')


def _records(out: str) -> list[dict]:
  with open(os.path.join(out, 'results.jsonl')) as f:
    return [json.loads(line) for line in f if line.strip()]


def _assert_same_records(a: list[dict], b: list[dict]) -> None:
  assert len(a) == len(b) > 1
  for ra, rb in zip(a, b):
    assert ra.keys() == rb.keys()
    for k in ra:
      if k == 'seconds':
        continue
      if isinstance(ra[k], float):
        assert ra[k] == pytest.approx(rb[k], abs=1e-4), (k, ra, rb)
      else:
        assert ra[k] == rb[k], (k, ra, rb)


def test_two_processes_match_one_write_once_and_resume(tmp_path):
  hook_dir = tmp_path / 'hook'
  hook_dir.mkdir()
  (hook_dir / 'sitecustomize.py').write_text(AUDIT_HOOK)
  # The hook works: it catches a write by a process that has it.
  probe_path = str(tmp_path / 'probe' / 'file')
  os.makedirs(os.path.dirname(probe_path))
  probe = subprocess.run([sys.executable, '-c', f'open({probe_path!r}, "w").close()'],
                         env=_env({'PYTHONPATH': str(hook_dir), 'DN_WATCH': os.path.dirname(probe_path),
                                   'DN_WRITE_LOG': str(tmp_path / 'probe_log')}), timeout=60)
  assert probe.returncode == 0 and (tmp_path / 'probe_log.raw').read_text().strip().endswith(probe_path)

  # Two processes (one CPU device each; process 1 audited) and, beside them, the one-process run.
  two, one = str(tmp_path / 'two'), str(tmp_path / 'one')
  procs = _start_pair(two, tmp_path, str(hook_dir))
  single = subprocess.Popen(_command(one), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)

  # SIGKILL both mid-run (after the first cycle's checkpoint), then start both again.
  ckpt = os.path.join(two, 'checkpoints')
  deadline = time.monotonic() + TIMEOUT
  while time.monotonic() < deadline and all(p.poll() is None for p in procs):
    if os.path.isdir(ckpt) and len([n for n in os.listdir(ckpt) if n.isdigit()]) >= 2:
      break
    time.sleep(0.05)
  if any(p.poll() is not None for p in procs):
    _wait(procs, tmp_path)  # raises (or skips) with the logs of a failed start
    pytest.fail('the run finished before it could be killed')
  for p in procs:
    p.send_signal(signal.SIGKILL)
  for p in procs:
    p.wait(timeout=30)
  killed_records = _records(two) if os.path.exists(os.path.join(two, 'results.jsonl')) else []
  procs = _start_pair(two, tmp_path, str(hook_dir))
  _wait(procs, tmp_path)
  assert 'resuming' in ''.join(f.read_text() for f in tmp_path.glob('log0-*'))

  _, err = single.communicate(timeout=TIMEOUT)
  assert single.returncode == 0, err[-3000:]
  records = _records(one)
  assert {r['cycle'] for r in records} == set(range(len(records))) and len(killed_records) < len(records)
  # The same records as one process (after a kill and a resume).
  _assert_same_records(_records(two), records)
  # Written once, by process 0: process 1 wrote nothing, and no file is there that one process would
  # not have written.
  raw = tmp_path / 'writes1.raw'
  assert not raw.exists(), f'process 1 wrote under --out:\n{raw.read_text()[:2000]}'
  assert sorted(os.listdir(two)) == sorted(os.listdir(one))
  # Every cycle's θ was saved (all processes took part in each save; none waited alone) and reloads as one
  # process's, to float rounding.
  from dropnet_jax.runs import saved_params
  selectors = saved_params.saved_selectors(two)
  assert selectors == saved_params.saved_selectors(one) and len(selectors) == len(records)
  for selector in selectors:
    theta_two, theta_one = saved_params.load_saved(two, selector)[1], saved_params.load_saved(one, selector)[1]
    for a, b in zip(jax.tree.leaves(theta_two), jax.tree.leaves(theta_one)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4)


@pytest.mark.parametrize('schedule', ['barrier', 'continuous'])
def test_two_processes_batch_trials_match_one_process(tmp_path, schedule):
  """--distributed --batch_trials: the lanes run data-parallel over both processes' devices (each
  lane's batch split, its state replicated, so every host read sees whole arrays); the records equal
  one process running the trials one by one."""
  args = ('--metrics=min,random', '--batch_trials', f'--lane_schedule={schedule}')
  two, one = str(tmp_path / 'two'), str(tmp_path / 'one')
  procs = _start_pair(two, tmp_path, args=args)
  single = subprocess.run(_command(one, '--metrics=min,random'), cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=TIMEOUT)
  assert single.returncode == 0, single.stderr[-3000:]
  _wait(procs, tmp_path)
  _assert_same_records(_records(two), _records(one))
