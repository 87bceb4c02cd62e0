"""Checkpointer (orbax CheckpointManager): the save policy, fallback past damaged checkpoints, a full disk in
one line, the old format refused in one line, SIGKILL safety.

Every checkpoint k written here holds values that are a function of k (see `state`), so a restore is checked
against what step k must contain, not just for "something came back".

Run as a script for the save-cost figures (Model A-sized state):
  .venv/bin/python tests/checkpoint_test.py
"""

from __future__ import annotations

import logging as py_logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from dropnet_jax.runs.checkpoint import TMP_MARKER, Checkpointer, CheckpointError, newest_meta

REPO = Path(__file__).resolve().parents[1]


def state(k: int) -> tuple[dict, dict]:
  """(arrays, meta) of checkpoint k: a jax array, a numpy array and JSON records."""
  arrays = {'w': [jnp.full((8, 5), float(k)), jnp.arange(7, dtype=jnp.int32) + k],
            'mask': np.full((5,), k % 2, np.float32)}
  meta = {'k': k, 'records': [{'cycle': i, 'acc': 0.5 + i / 1000} for i in range(k)]}
  return arrays, meta


def template(meta: dict) -> dict:
  del meta
  return {'w': [jax.ShapeDtypeStruct((8, 5), jnp.float32), jax.ShapeDtypeStruct((7,), jnp.int32)],
          'mask': np.zeros((5,), np.float32)}


def check_is_state(k: int, meta: dict, arrays: dict) -> None:
  want_arrays, want_meta = state(k)
  assert meta == want_meta
  for got, want in zip([*arrays['w'], arrays['mask']], [*want_arrays['w'], want_arrays['mask']]):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def write_steps(directory, n: int, **kwargs) -> None:
  with Checkpointer(str(directory), **kwargs) as ck:
    for k in range(1, n + 1):
      assert ck.save(*state(k)) == k


def steps_on_disk(directory) -> list[int]:
  return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


# -- saving and the policy -----------------------------------------------------------------------------


@pytest.mark.parametrize('async_save', [True, False])
def test_round_trip_keeps_the_newest_max_to_keep(tmp_path, async_save):
  write_steps(tmp_path, 5, max_to_keep=3, async_save=async_save)
  assert steps_on_disk(tmp_path) == [3, 4, 5]
  with Checkpointer(str(tmp_path)) as ck:
    step, meta, arrays = ck.restore_latest(template)
    assert step == 5
    check_is_state(5, meta, arrays)
    assert isinstance(arrays['w'][0], jax.Array) and isinstance(arrays['mask'], np.ndarray)
    check_is_state(4, ck.restore_meta(4), ck.restore_arrays(template(None), 4))
    assert ck.save(*state(6)) == 6  # numbering continues after a reopen
  assert newest_meta(str(tmp_path)) == state(6)[1]


def test_empty_directory_restores_none(tmp_path):
  with Checkpointer(str(tmp_path)) as ck:
    assert ck.restore_latest(template) is None and ck.restore_meta() is None
  assert newest_meta(str(tmp_path / 'absent')) is None


def test_interval_zero_saves_cycle_ends_and_forced_offers_and_keeps_the_rest(tmp_path):
  with Checkpointer(str(tmp_path), interval_s=0) as ck:
    assert ck.save_unsaved() is None  # nothing kept yet
    assert not ck.offer(*state(1))  # an epoch end: kept, not saved
    assert ck.offer(*state(2), cycle_end=True)  # a cycle end: saved, and the kept epoch end dropped
    assert ck.save_unsaved() is None
    assert not ck.offer(*state(3))
    assert ck.offer(*state(4), force=True)  # --checkpoint_every_epochs
    assert not ck.offer(*state(5))
    assert ck.save_unsaved() == 3  # an interrupt or the end: the newest kept offer
    assert ck.save_unsaved() is None
    ck.wait()
    assert [ck.restore_meta(s)['k'] for s in ck.all_steps()] == [2, 4, 5]


def test_interval_saves_at_most_every_interval_and_an_interrupt_saves_the_newest_offer(tmp_path):
  with Checkpointer(str(tmp_path), interval_s=2.0, max_to_keep=10) as ck:
    assert ck.offer(*state(1))  # no checkpoint yet: saved at once
    assert not ck.offer(*state(2), cycle_end=True) and not ck.offer(*state(3))  # within the interval
    time.sleep(2.1)
    assert ck.offer(*state(4))  # the interval has passed: the next boundary saves
    assert not ck.offer(*state(5))
    assert ck.save_unsaved() == 3
    ck.wait()
    assert [ck.restore_meta(s)['k'] for s in ck.all_steps()] == [1, 4, 5]


def test_settings_are_checked(tmp_path):
  with pytest.raises(ValueError, match='max_to_keep'):
    Checkpointer(str(tmp_path), max_to_keep=0)
  with pytest.raises(ValueError, match='interval_s'):
    Checkpointer(str(tmp_path), interval_s=-1)
  with Checkpointer(str(tmp_path)) as ck, pytest.raises(TypeError, match='JSON'):
    ck.save(state(1)[0], {'x': object()})


# -- restoring -----------------------------------------------------------------------------------------


def test_a_template_of_other_shapes_is_refused(tmp_path):
  write_steps(tmp_path, 1)
  with Checkpointer(str(tmp_path)) as ck, pytest.raises(ValueError, match='shape'):
    ck.restore_arrays({**template(None), 'mask': np.zeros((6,), np.float32)})


def data_files(step_dir: Path) -> list[Path]:
  return sorted(p for p in (step_dir / 'arrays').rglob('*') if p.is_file() and p.parent.name == 'd')


@pytest.mark.parametrize('damage', ['delete_meta', 'truncate_meta', 'truncate_arrays', 'delete_arrays'])
def test_falls_back_past_a_damaged_newest_checkpoint_with_one_warning(tmp_path, caplog, damage):
  write_steps(tmp_path, 3)
  step_dir = tmp_path / '3'
  meta_file = step_dir / 'meta' / 'metadata'
  if damage == 'delete_meta':
    meta_file.unlink()
  elif damage == 'truncate_meta':
    meta_file.write_bytes(meta_file.read_bytes()[:-20])
  elif damage == 'truncate_arrays':
    files = data_files(step_dir)
    assert files
    for f in files:
      f.write_bytes(f.read_bytes()[:len(f.read_bytes()) // 2])
  else:
    for f in data_files(step_dir):
      f.unlink()
  with caplog.at_level(py_logging.WARNING), Checkpointer(str(tmp_path)) as ck:
    step, meta, arrays = ck.restore_latest(template)
  assert step == 2
  check_is_state(2, meta, arrays)
  warnings = [r.getMessage() for r in caplog.records
              if r.levelno >= py_logging.WARNING and 'unreadable' in r.getMessage()]
  assert len(warnings) == 1 and str(step_dir) in warnings[0], warnings


def test_every_checkpoint_damaged_is_one_clear_error(tmp_path):
  write_steps(tmp_path, 2)
  for s in (1, 2):
    (tmp_path / str(s) / 'meta' / 'metadata').write_text('{')
  with Checkpointer(str(tmp_path)) as ck, pytest.raises(CheckpointError, match='none of the 2 checkpoints'):
    ck.restore_latest(template)


def test_an_error_of_make_template_is_not_taken_for_damage(tmp_path):
  write_steps(tmp_path, 2)

  def refuse(meta):
    raise CheckpointError(f'another experiment ({meta["k"]})')

  with Checkpointer(str(tmp_path)) as ck, pytest.raises(CheckpointError, match=r'another experiment \(2\)'):
    ck.restore_latest(refuse)


def test_a_directory_of_the_old_own_format_is_refused_in_one_line(tmp_path):
  (tmp_path / '4').mkdir()
  (tmp_path / '4' / 'arrays.bin').write_bytes(b'dropnet_jax checkpoint arrays v1\n')
  (tmp_path / '4' / 'meta.json').write_text('{}')
  with pytest.raises(CheckpointError, match='format of older versions') as e:
    Checkpointer(str(tmp_path))
  assert '\n' not in str(e.value)


def test_a_run_directory_with_old_checkpoints_is_refused_before_anything_is_written(tmp_path):
  from dropnet_jax.config import ExperimentConfig
  from dropnet_jax.runs.run_dir import RunDir
  (tmp_path / 'checkpoints' / '4').mkdir(parents=True)
  (tmp_path / 'checkpoints' / '4' / 'arrays.bin').write_bytes(b'dropnet_jax checkpoint arrays v1\n')
  with pytest.raises(ValueError, match='format of older versions'):
    RunDir(str(tmp_path), 'dropnet', ExperimentConfig()).check()
  assert sorted(os.listdir(tmp_path)) == ['checkpoints']


# -- failures and kills, in a subprocess (stderr and signals as a user sees them) ------------------------


def run_script(tmp_path, script: str, *args: str, **kw) -> subprocess.Popen:
  path = tmp_path / 'script.py'
  path.write_text(textwrap.dedent(script))
  return subprocess.Popen([sys.executable, str(path), str(REPO / 'tests'), *args], cwd=REPO, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


FULL_DISK = '''
    import sys
    sys.path.insert(0, sys.argv[1])
    import jax
    from dropnet_jax.runs.checkpoint import Checkpointer, CheckpointError
    big = {'w': [jax.random.normal(jax.random.key(i), (300, 300)) for i in range(3)]}
    ck = Checkpointer(sys.argv[2])
    try:
      for k in range(3):
        ck.save(big, {'k': k})
      ck.close()
    except CheckpointError as e:
      print(f'error: {e}', file=sys.stderr)
      sys.exit(1)
'''


def test_a_full_disk_is_one_line_without_tracebacks(tmp_path):
  disk = tmp_path / 'disk'
  disk.mkdir()
  if subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=600k', 'tmpfs', str(disk)], capture_output=True).returncode:
    pytest.skip('cannot mount a small tmpfs here (needs root)')
  try:
    proc = run_script(tmp_path, FULL_DISK, str(disk / 'ck'))
    _, err = proc.communicate(timeout=120)
  finally:
    subprocess.run(['umount', str(disk)], check=False)
  assert proc.returncode == 1
  lines = [l for l in err.splitlines() if not l.startswith(('I1', 'W1'))]  # absl's INFO/WARNING lines of XLA
  assert len(lines) == 1 and 'No space left on device' in lines[0], err[-3000:]


SAVER = '''
    import sys
    sys.path.insert(0, sys.argv[1])
    from checkpoint_test import state
    from dropnet_jax.runs.checkpoint import Checkpointer
    ck = Checkpointer(sys.argv[2], max_to_keep=3)
    k = 0
    while True:
      k += 1
      ck.save(*state(k))
      print(k, flush=True)
'''


def test_sigkill_during_a_stream_of_async_saves_leaves_the_newest_checkpoint_readable(tmp_path):
  proc = run_script(tmp_path, SAVER, str(tmp_path / 'ck'))
  try:
    last = 0
    while last < 5:
      last = int(proc.stdout.readline())
    proc.send_signal(signal.SIGKILL)
    out, _ = proc.communicate(timeout=60)
  finally:
    proc.kill()
  last = max([last, *(int(s) for s in out.split())])
  with Checkpointer(str(tmp_path / 'ck')) as ck:
    assert not [n for n in os.listdir(tmp_path / 'ck') if TMP_MARKER in n]  # the killed save's leftovers: cleaned
    step, meta, arrays = ck.restore_latest(template)
  # A save waits for the previous one's commit: a kill loses at most the one being written.
  assert step in (last - 1, last, last + 1)
  check_is_state(step, meta, arrays)


# -- the save-cost figures (not a test) ---------------------------------------------------------------


def model_a_state(k: int) -> tuple[dict, dict]:
  """A DropNet driver's checkpoint of Model A (784-40-40-10 MLP, 33,450 params) mid-cycle."""
  shapes = [(784, 40), (40,), (40, 40), (40,), (40, 10), (10,)]
  params = lambda: [jnp.full(s, float(k)) for s in shapes]
  arrays = {'params0': params(), 'masks': [jnp.ones(40), jnp.ones(40)], 'dense_sums': [jnp.zeros(40)] * 4,
            'fit': params() + params() + params() + [jnp.ones(40)] * 6 + [jnp.zeros(2, jnp.uint32)]
            + [jnp.zeros((), jnp.int32)] * 4 + [jnp.zeros(())] * 5, 'dense_params': params()}
  record = {'seed': 0, 'metric': 'min', 'cycle': 3, 'units': [40, 36], 'val_accuracy': 0.9, 'test_loss': 0.3}
  return arrays, {'version': 1, 'records': [dict(record, cycle=i) for i in range(100)], 'k': k}


def bench(directory: str, n: int = 20) -> None:
  """Median time of save() (the caller's part) and of a whole save (save + wait), and of an offer kept."""
  import shutil
  shutil.rmtree(directory, ignore_errors=True)
  with Checkpointer(directory, interval_s=3600) as ck:
    calls, whole, offers = [], [], []
    for k in range(n):
      t = time.perf_counter()
      ck.save(*model_a_state(k))
      calls.append(time.perf_counter() - t)
      ck.wait()
      whole.append(time.perf_counter() - t)
      arrays, meta = model_a_state(k)
      t = time.perf_counter()
      ck.offer(arrays, meta)
      offers.append(time.perf_counter() - t)
  print(f'Model A state, median of {n}: save() {np.median(calls) * 1e3:.1f} ms, save + wait '
        f'{np.median(whole) * 1e3:.1f} ms, an offer kept {np.median(offers) * 1e3:.2f} ms')


if __name__ == '__main__':
  import tempfile
  from absl import logging
  logging.set_verbosity(logging.WARNING)
  with tempfile.TemporaryDirectory() as d:
    bench(os.path.join(d, 'ck'))
