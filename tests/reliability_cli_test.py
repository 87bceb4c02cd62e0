"""Runs that cannot be silently corrupted (issue 16): every case through the real entry point.

Each test is a defect found by a hostile but realistic user; it fails on the code before the fix.
"""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from cli_test import idx_dir, write_idx
from dropnet_jax.runs import reporting

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, '-m', 'experiments.dropnet', '--widths=6,6', '--metrics=min', '--max_epochs=2',
       '--floor=0.4', '--noverbose']


def run(args, **kw):
  return subprocess.run(CLI + args, cwd=REPO, capture_output=True, text=True, **kw)


def one_line_error(proc, *words):
  assert proc.returncode != 0, proc.stdout[-2000:]
  assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]
  assert all(w in proc.stderr for w in words), proc.stderr[-3000:]


def comparable(path):
  return [{k: v for k, v in r.items() if k != 'seconds'} for r in reporting.read_jsonl(path)]


def test_resume_with_other_data_is_refused_and_moved_files_resume(tmp_path):
  data = idx_dir(tmp_path / 'a')
  out = tmp_path / 'run'
  args = ['--dataset=mnist', '--batch_size=10', f'--out={out}']
  first = run(args + [f'--data_dir={data}'])
  assert first.returncode == 0, first.stderr[-3000:]
  shuffled = tmp_path / 'b'
  shutil.copytree(data, shuffled)  # same images, shuffled labels
  write_idx(shuffled / 'train-labels-idx1-ubyte.gz', np.random.default_rng(1).permutation(np.arange(60) % 10), 0x801)
  before = (out / 'results.jsonl').read_bytes()
  other = run(args + [f'--data_dir={shuffled}'])
  one_line_error(other, 'data_fingerprint')
  assert (out / 'results.jsonl').read_bytes() == before
  moved = tmp_path / 'moved'
  shutil.move(str(data), moved)
  again = run(args + [f'--data_dir={moved}'])  # the same files elsewhere: accepted
  assert again.returncode == 0, again.stderr[-3000:]
  assert (out / 'results.jsonl').read_bytes() == before


def test_stale_checkpoints_without_config_are_refused(tmp_path):
  out = tmp_path / 'run'
  assert run([f'--out={out}', '--metrics=min,max']).returncode == 0
  os.remove(out / 'config.json')
  os.remove(out / 'results.jsonl')
  other = run([f'--out={out}', '--max_epochs=3'])
  one_line_error(other, 'checkpoints were made with other settings', 'max_epochs')
  assert not (out / 'config.json').exists()


def test_a_damaged_newest_checkpoint_falls_back_with_one_warning(tmp_path):
  out = tmp_path / 'run'
  reference = tmp_path / 'ref'
  assert run([f'--out={reference}']).returncode == 0
  assert run([f'--out={out}', '--checkpoint_every_epochs=1']).returncode == 0
  steps = sorted(int(d) for d in os.listdir(out / 'checkpoints') if d.isdigit())
  data = [p for p in (out / 'checkpoints' / str(steps[-1]) / 'arrays').rglob('*')
          if p.is_file() and p.parent.name == 'd']
  assert data  # orbax's array data files (OCDBT)
  for f in data:
    f.write_bytes(f.read_bytes()[:-50])  # truncated
  os.remove(out / 'results.jsonl')
  again = run([f'--out={out}', '--checkpoint_every_epochs=1'])
  assert again.returncode == 0, again.stderr[-3000:]
  assert again.stderr.count('unreadable') == 1 and str(steps[-1]) in again.stderr
  assert comparable(out / 'results.jsonl') == comparable(reference / 'results.jsonl')


def test_checks_run_before_anything_is_written(tmp_path):
  out = tmp_path / 'run'
  env = {**os.environ, 'PYTHONUNBUFFERED': '1'}
  proc = subprocess.run(CLI + ['--host_devices=2', '--batch_size=33', f'--out={out}'], cwd=REPO,
                        capture_output=True, text=True, env=env)
  one_line_error(proc, 'batch_size')
  assert not out.exists()
  one_line_error(run(['--lr=nan', f'--out={out}']), 'lr')
  one_line_error(run(['--out=']), '--out')
  a_file = tmp_path / 'file'
  a_file.write_text('x')
  one_line_error(run([f'--out={a_file}']), 'is a file')
  assert not out.exists()


def test_a_second_run_into_the_same_out_is_refused(tmp_path):
  out = tmp_path / 'run'
  out.mkdir()
  holder = subprocess.Popen([sys.executable, '-c', (
      'import sys, time\nfrom dropnet_jax.runs.lock import RunLock\n'
      f'with RunLock({str(out)!r}):\n  print("held", flush=True)\n  time.sleep(60)')],
      cwd=REPO, stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == 'held'
    second = run([f'--out={out}'])
    one_line_error(second, 'in use', str(holder.pid))
    assert not (out / 'config.json').exists()
  finally:
    holder.kill()
    holder.wait()
  assert run([f'--out={out}']).returncode == 0  # the killed holder's lock does not block


@pytest.mark.parametrize('signum, code, line', [
    (signal.SIGINT, 130, 'interrupted; rerun the same command to resume'),
    (signal.SIGTERM, 143, 'terminated (SIGTERM); rerun the same command to resume')], ids=['ctrl_c', 'sigterm'])
def test_ctrl_c_and_sigterm_stop_cleanly_and_resume(tmp_path, signum, code, line):
  """Ctrl-C and a cluster scheduler's SIGTERM end a run the same way: the save in flight finishes, one
  line says how to resume, and the rerun gives the uninterrupted records."""
  out = tmp_path / 'run'
  reference = tmp_path / 'ref'
  args = ['--metrics=min,max', '--max_epochs=4', '--checkpoint_every_epochs=1']
  assert run(args + [f'--out={reference}']).returncode == 0
  proc = subprocess.Popen(CLI + args + [f'--out={out}'], cwd=REPO, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 120
  while time.time() < deadline and not (out / 'checkpoints').exists():
    time.sleep(0.05)
  while time.time() < deadline and len(os.listdir(out / 'checkpoints')) < 2:
    time.sleep(0.05)
  proc.send_signal(signum)
  _, err = proc.communicate(timeout=120)
  if proc.returncode == 0:
    pytest.skip('the run finished before the interrupt arrived')
  assert proc.returncode == code and line in err, err[-2000:]
  assert 'Traceback' not in err
  assert not [d for d in os.listdir(out / 'checkpoints') if 'tmp' in d]
  again = run(args + [f'--out={out}'])
  assert again.returncode == 0, again.stderr[-3000:]
  assert comparable(out / 'results.jsonl') == comparable(reference / 'results.jsonl')
