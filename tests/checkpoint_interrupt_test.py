"""The checkpoint policy through the real entry point: with a long `--checkpoint_interval_s` nothing is saved
between the first checkpoint and the end, yet SIGTERM (a scheduler's preemption) saves the newest epoch end, and
the rerun continues from it to the uninterrupted records."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from dropnet_jax.runs import reporting
from dropnet_jax.runs.checkpoint import Checkpointer

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, '-m', 'experiments.dropnet', '--widths=6,6', '--metrics=min', '--max_epochs=4',
       '--floor=0.4', '--checkpoint_interval_s=3600']
ENV = {**os.environ, 'PYTHONUNBUFFERED': '1'}


def comparable(path):
  return [{k: v for k, v in r.items() if k != 'seconds'} for r in reporting.read_jsonl(path)]


@pytest.mark.slow  # three runs of the entry point
def test_sigterm_saves_the_newest_epoch_end_and_the_rerun_continues_from_it(tmp_path):
  reference, out = tmp_path / 'ref', tmp_path / 'run'
  ref = subprocess.run(CLI + ['--noverbose', f'--out={reference}'], cwd=REPO, capture_output=True, text=True, env=ENV)
  assert ref.returncode == 0, ref.stderr[-3000:]
  assert len(os.listdir(reference / 'checkpoints')) == 2  # the first epoch end (none before it) and the end
  proc = subprocess.Popen(CLI + ['--verbose', f'--out={out}'], cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, env=ENV)
  try:
    for line in proc.stdout:  # per-epoch lines
      if 'cycle  1 epoch   2' in line:  # well past the first checkpoint (the dense cycle's epoch 1)
        proc.send_signal(signal.SIGTERM)
        break
    _, err = proc.communicate(timeout=120)
  finally:
    proc.kill()
  if proc.returncode == 0:
    pytest.skip('the run finished before the signal arrived')
  assert proc.returncode == 143 and 'terminated (SIGTERM); rerun the same command to resume' in err, err[-3000:]
  assert 'Traceback' not in err
  with Checkpointer(str(out / 'checkpoints')) as ck:
    assert ck.all_steps() == [1, 2]  # the first epoch end, then the one saved on SIGTERM
    meta = ck.restore_meta()
  assert meta['trials'][0]['records'] and meta['fit']['cycle'] >= 1  # cycle 0 recorded, inside cycle 1 or later
  again = subprocess.run(CLI + ['--verbose', f'--out={out}'], cwd=REPO, capture_output=True, text=True, env=ENV)
  assert again.returncode == 0, again.stderr[-3000:]
  assert 'resuming from the checkpoint' in again.stdout + again.stderr
  assert 'dense cycle  0 epoch   1' not in again.stdout  # nothing of cycle 0 trained again
  assert comparable(out / 'results.jsonl') == comparable(reference / 'results.jsonl')
