"""Checkpointer: async saves, fallback past damaged checkpoints, SIGKILL and Ctrl-C safety.

Every checkpoint k written here holds values that are a function of k (see
`state`), so a restore is checked against what step k must contain, not just
for "something came back".

Run as a script for the save-cost figures (Model A-sized state, sync vs async):
  .venv/bin/python tests/checkpoint_test.py
"""

from __future__ import annotations

import logging as py_logging
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from dropnet_jax.runs import checkpoint
from dropnet_jax.runs.checkpoint import TMP_MARKER, Checkpointer, CheckpointError

REPO = Path(__file__).resolve().parents[1]


def state(k: int) -> tuple[dict, dict]:
  """(arrays, meta) of checkpoint k: a jax array, a numpy array and JSON records."""
  arrays = {'w': [jnp.full((8, 5), float(k)), jnp.arange(7, dtype=jnp.int32) + k],
            'mask': np.full((5,), k % 2, np.float32)}
  meta = {'k': k, 'records': [{'cycle': i, 'acc': 0.5 + i / 1000} for i in range(k)]}
  return arrays, meta


def template(meta: dict) -> dict:
  del meta
  return {'w': [np.zeros((8, 5), np.float32), np.zeros((7,), np.int32)], 'mask': np.zeros((5,), np.float32)}


def check_is_state(k: int, meta: dict, arrays: dict) -> None:
  want_arrays, want_meta = state(k)
  assert meta == want_meta
  for got, want in zip([*arrays['w'], arrays['mask']], [*want_arrays['w'], want_arrays['mask']]):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def write_steps(directory, n: int, **kwargs) -> None:
  with Checkpointer(str(directory), **kwargs) as ck:
    for k in range(1, n + 1):
      assert ck.save(*state(k)) == k


def tmp_dirs(directory) -> list[str]:
  return [n for n in os.listdir(directory) if TMP_MARKER in n]


# -- saving ------------------------------------------------------------------------------------------


@pytest.mark.parametrize('async_save,fsync', [(True, False), (False, False), (True, True)])
def test_round_trip_newest_step(tmp_path, async_save, fsync):
  write_steps(tmp_path, 4, async_save=async_save, fsync=fsync, max_to_keep=3)
  with Checkpointer(str(tmp_path)) as ck:
    assert ck.all_steps() == [2, 3, 4]
    step, meta, arrays = ck.restore_latest(template)
    assert step == 4
    check_is_state(4, meta, arrays)
    check_is_state(3, ck.restore_meta(3), ck.restore_arrays(template(None), 3))  # the old API


def test_empty_directory_restores_none(tmp_path):
  with Checkpointer(str(tmp_path / 'ck')) as ck:
    assert ck.restore_latest(template) is None and ck.restore_meta() is None


def test_sync_save_is_on_disk_when_it_returns(tmp_path):
  ck = Checkpointer(str(tmp_path), async_save=False)
  ck.save(*state(1))
  assert os.listdir(tmp_path) == ['1']  # committed, no tmp dir
  ck.close()


def delay_writes(monkeypatch, seconds: float, log: list | None = None) -> None:
  """Delays the background write of the arrays, as a slow disk would; logs when each is written."""
  original = checkpoint._write_arrays

  def write(path, *args):
    time.sleep(seconds)
    original(path, *args)
    if log is not None:
      log.append((os.path.basename(os.path.dirname(path)), time.perf_counter()))

  monkeypatch.setattr(checkpoint, '_write_arrays', write)


def test_async_save_snapshots_inputs_the_caller_keeps_mutating(tmp_path, monkeypatch):
  delay_writes(monkeypatch, 0.5)  # the write is still pending while we mutate
  arrays, meta = state(3)
  with Checkpointer(str(tmp_path)) as ck:
    ck.save(arrays, meta)
    assert '1' not in os.listdir(tmp_path)  # not committed yet
    arrays['mask'][:] = 7.0
    meta['records'].append({'cycle': 99})
    meta['k'] = -1
  with Checkpointer(str(tmp_path)) as ck:
    _, got_meta, got_arrays = ck.restore_latest(template)
  check_is_state(3, got_meta, got_arrays)


def test_async_save_returns_before_the_commit_and_the_next_save_waits(tmp_path, monkeypatch):
  log = []
  delay_writes(monkeypatch, 1.0, log)
  ck = Checkpointer(str(tmp_path))
  ck.save(*state(1))
  returned_1 = time.perf_counter()
  assert ck.latest_step() == 1 and '1' not in os.listdir(tmp_path) and not log  # still being written
  ck.save(*state(2))
  # Save 2 started only once save 1 was written and committed.
  assert [name for name, _ in log] == ['1' + TMP_MARKER] and '1' in os.listdir(tmp_path)
  assert log[0][1] - returned_1 > 0.5  # save 1 had returned long before its write ended
  ck.close()
  assert sorted(os.listdir(tmp_path)) == ['1', '2']


def test_a_failed_background_write_is_reported_and_not_restored(tmp_path, monkeypatch):
  original = checkpoint._write_arrays
  failures = [OSError(28, 'No space left on device')]

  def write(path, *args):
    if f'{os.sep}2{TMP_MARKER}{os.sep}' in path and failures:
      raise failures.pop()
    original(path, *args)

  monkeypatch.setattr(checkpoint, '_write_arrays', write)
  ck = Checkpointer(str(tmp_path))
  ck.save(*state(1))
  ck.save(*state(2))  # returns: the write fails in the background
  with pytest.raises(CheckpointError, match='checkpoint 2 failed: OSError.*No space left'):
    ck.save(*state(3))  # ... and the next save reports it
  assert sorted(os.listdir(tmp_path)) == ['1']
  assert ck.save(*state(3)) == 2  # a retry works, under the number that failed
  ck.close()
  assert sorted(os.listdir(tmp_path)) == ['1', '2']
  with Checkpointer(str(tmp_path)) as ck:
    step, meta, arrays = ck.restore_latest(template)
  assert step == 2
  check_is_state(3, meta, arrays)


def test_stale_tmp_dirs_are_removed_on_open(tmp_path):
  write_steps(tmp_path, 2)
  stale = [tmp_path / ('3' + TMP_MARKER), tmp_path / ('1' + TMP_MARKER + '-deleting'),
           tmp_path / '4.orbax-checkpoint-tmp']  # a write, a deletion and an old orbax write cut short
  for d in stale:
    d.mkdir()
    (d / checkpoint.ARRAYS_FILE).write_bytes(checkpoint.MAGIC)
  with Checkpointer(str(tmp_path)) as ck:
    assert not any(d.exists() for d in stale)
    assert ck.latest_step() == 2
    assert ck.save(*state(3)) == 3
  with Checkpointer(str(tmp_path)) as ck:
    step, meta, arrays = ck.restore_latest(template)
  assert step == 3
  check_is_state(3, meta, arrays)


def test_abstract_templates_give_jax_arrays_numpy_ones_numpy_and_unusual_dtypes_round_trip(tmp_path):
  arrays = {'b': jnp.arange(6, dtype=jnp.bfloat16).reshape(2, 3), 'key': jax.random.key_data(jax.random.key(3)),
            'flag': np.array(True), 'empty': np.zeros((0, 4), np.float32), 'big_endian': np.arange(3, dtype='>i4')}
  with Checkpointer(str(tmp_path)) as ck:
    ck.save(arrays, {})
    abstract = {k: jax.ShapeDtypeStruct(x.shape, x.dtype) for k, x in arrays.items() if k != 'big_endian'}
    got = ck.restore_arrays({**abstract, 'big_endian': np.zeros(3, '>i4')})
  for name, want in arrays.items():
    assert isinstance(got[name], np.ndarray if name == 'big_endian' else jax.Array), name
    assert got[name].dtype == want.dtype.newbyteorder('='), name  # big-endian comes back native
    np.testing.assert_array_equal(np.asarray(got[name]), np.asarray(want))


def test_a_template_of_other_shapes_is_refused(tmp_path):
  write_steps(tmp_path, 1)
  with Checkpointer(str(tmp_path)) as ck:
    wrong = template(None)
    wrong['w'][0] = np.zeros((8, 6), np.float32)
    with pytest.raises(CheckpointError, match=r"\['w'\]\[0\] is float32\[8, 5\], expected float32\[8, 6\]"):
      ck.restore_arrays(wrong)
    del wrong['mask']
    with pytest.raises(CheckpointError, match='unexpected'):
      ck.restore_arrays(wrong)


# -- falling back past damaged checkpoints ----------------------------------------------------------


def damage(path: Path, how: str) -> None:
  if how == 'delete':
    os.remove(path)
  else:
    os.truncate(path, os.path.getsize(path) // 2)


@pytest.mark.parametrize('how', ['delete', 'truncate'])
@pytest.mark.parametrize('name', [checkpoint.ARRAYS_FILE, checkpoint.META_FILE])
def test_falls_back_past_a_damaged_newest_checkpoint(tmp_path, caplog, name, how):
  write_steps(tmp_path, 3)
  damage(tmp_path / '3' / name, how)
  caplog.set_level(py_logging.WARNING)
  with Checkpointer(str(tmp_path)) as ck:
    step, meta, arrays = ck.restore_latest(template)
  assert step == 2
  check_is_state(2, meta, arrays)
  messages = [r.getMessage() for r in caplog.records if r.levelno >= py_logging.WARNING]
  assert len(messages) == 1, messages
  assert str(tmp_path / '3') in messages[0] and '\n' not in messages[0]


def test_a_flipped_bit_anywhere_in_the_arrays_file_is_detected(tmp_path):
  write_steps(tmp_path, 1)
  path = tmp_path / '1' / checkpoint.ARRAYS_FILE
  good = path.read_bytes()
  with Checkpointer(str(tmp_path)) as ck:
    for offset in range(0, len(good), 3):  # magic, header length, header, its CRC, the leaves' bytes
      bad = bytearray(good)
      bad[offset] ^= 0x04
      path.write_bytes(bytes(bad))
      with pytest.raises(Exception):
        ck.restore_arrays(template(None), 1)
    path.write_bytes(good + b'\0')
    with pytest.raises(CheckpointError, match='trailing'):
      ck.restore_arrays(template(None), 1)


def test_falls_back_two_steps_and_saves_after_them(tmp_path, caplog):
  write_steps(tmp_path, 3)
  damage(tmp_path / '3' / checkpoint.ARRAYS_FILE, 'delete')
  damage(tmp_path / '2' / checkpoint.META_FILE, 'truncate')
  caplog.set_level(py_logging.WARNING)
  with Checkpointer(str(tmp_path)) as ck:
    step, meta, arrays = ck.restore_latest(template)
    assert step == 1
    check_is_state(1, meta, arrays)
    assert ck.save(*state(4)) == 4  # numbering continues past the damaged ones
  warned = [r.getMessage() for r in caplog.records if r.levelno >= py_logging.WARNING]
  assert len(warned) == 2 and str(tmp_path / '3') in warned[0] and str(tmp_path / '2') in warned[1]
  with Checkpointer(str(tmp_path)) as ck:
    step, meta, arrays = ck.restore_latest(template)
  assert step == 4
  check_is_state(4, meta, arrays)


def test_every_checkpoint_damaged_is_one_clear_error(tmp_path):
  write_steps(tmp_path, 3)
  for k, name in zip((1, 2, 3), (checkpoint.ARRAYS_FILE, checkpoint.META_FILE, checkpoint.ARRAYS_FILE)):
    damage(tmp_path / str(k) / name, 'truncate')
  with Checkpointer(str(tmp_path)) as ck, pytest.raises(CheckpointError) as e:
    ck.restore_latest(template)
  message = str(e.value)
  assert '\n' not in message and str(tmp_path) in message and 'none of the 3 checkpoints' in message


def test_a_checkpoint_of_the_old_orbax_layout_is_named_as_such(tmp_path):
  (tmp_path / '7' / 'meta').mkdir(parents=True)
  (tmp_path / '7' / 'arrays').mkdir()
  with Checkpointer(str(tmp_path)) as ck, pytest.raises(CheckpointError, match='orbax layout'):
    ck.restore_latest(template)


def test_an_error_of_make_template_is_not_taken_for_damage(tmp_path):
  write_steps(tmp_path, 2)

  def refuse(meta):
    raise ValueError(f'checkpoint of another experiment (k={meta["k"]})')

  with Checkpointer(str(tmp_path)) as ck, pytest.raises(ValueError, match='k=2'):
    ck.restore_latest(refuse)


# -- Ctrl-C and SIGKILL ------------------------------------------------------------------------------


def test_ctrl_c_inside_save_is_deferred_until_the_write_is_under_way(tmp_path, monkeypatch):
  original = checkpoint._encode_arrays
  def interrupted(*args):
    signal.raise_signal(signal.SIGINT)  # Ctrl-C between copying the arrays and starting the write
    return original(*args)

  ck = Checkpointer(str(tmp_path))
  ck.save(*state(1))
  monkeypatch.setattr(checkpoint, '_encode_arrays', interrupted)
  with pytest.raises(KeyboardInterrupt) as e:
    ck.save(*state(2))
  assert e.traceback[-1].path.name == 'checkpoint.py'  # raised by sigint_deferred, after the copy
  ck.close()  # what the CLI does on KeyboardInterrupt: the save is finished, not torn
  assert sorted(os.listdir(tmp_path)) == ['1', '2']
  with Checkpointer(str(tmp_path)) as ck:
    step, meta, arrays = ck.restore_latest(template)
  assert step == 2
  check_is_state(2, meta, arrays)
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_ctrl_c_while_waiting_for_a_write_leaves_it_running_and_close_finishes_it(tmp_path, monkeypatch):
  delay_writes(monkeypatch, 1.0)
  ck = Checkpointer(str(tmp_path))
  ck.save(*state(1))
  threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT)).start()
  with pytest.raises(KeyboardInterrupt):
    ck.wait()
  assert '1' not in os.listdir(tmp_path)  # still being written
  ck.close()
  assert os.listdir(tmp_path) == ['1']
  with Checkpointer(str(tmp_path)) as ck:
    step, meta, arrays = ck.restore_latest(template)
  check_is_state(1, meta, arrays)


SAVER = textwrap.dedent('''
    import sys
    sys.path.insert(0, sys.argv[2])
    from checkpoint_test import state
    from dropnet_jax.runs.checkpoint import Checkpointer
    ck = Checkpointer(sys.argv[1], max_to_keep=3)
    try:
      k = 0
      while True:
        k += 1
        assert ck.save(*state(k)) == k
        print(k, flush=True)
    except KeyboardInterrupt:
      ck.close()
      print('interrupted', flush=True)
      sys.exit(130)
''')


def start_saver(tmp_path, script: str) -> subprocess.Popen:
  (tmp_path / 'saver.py').write_text(script)
  env = {**os.environ, 'PYTHONPATH': str(REPO), 'JAX_PLATFORMS': 'cpu'}
  return subprocess.Popen([sys.executable, str(tmp_path / 'saver.py'), str(tmp_path / 'ck'), str(REPO / 'tests')],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def read_steps(proc: subprocess.Popen, at_least: int) -> int:
  for _ in range(at_least):
    line = proc.stdout.readline()
    assert line.strip().isdigit(), (line, proc.stderr.read() if proc.poll() is not None else '')
  return int(line)


@pytest.mark.parametrize('sig', [signal.SIGINT, signal.SIGKILL])
def test_signal_during_a_stream_of_async_saves_leaves_the_newest_checkpoint_readable(tmp_path, sig):
  proc = start_saver(tmp_path, SAVER)
  try:
    last = read_steps(proc, 5)
    time.sleep(random.uniform(0, 0.05))  # anywhere in a save: snapshot, wait, copy, the background write
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
  finally:
    proc.kill()
  printed = [int(s) for s in out.split() if s.isdigit()]
  last = max([last, *printed])
  if sig == signal.SIGINT:
    assert proc.returncode == 130 and out.endswith('interrupted\n'), (out, err)
    assert 'Traceback' not in err, err
    assert not tmp_dirs(tmp_path / 'ck')  # the interrupted save was finished, not left half-done
  else:
    assert proc.returncode == -signal.SIGKILL
  with Checkpointer(str(tmp_path / 'ck')) as ck:
    assert not tmp_dirs(tmp_path / 'ck')
    step, meta, arrays = ck.restore_latest(template)
  # SIGINT: every save that started is finished by close(), the interrupted one too. SIGKILL
  # loses at most the one save still being written: a save waits for the previous one's commit.
  assert step in ((last, last + 1) if sig == signal.SIGINT else (last - 1, last, last + 1))
  check_is_state(step, meta, arrays)


HANGING_SAVER = textwrap.dedent('''
    import sys, time
    sys.path.insert(0, sys.argv[2])
    from checkpoint_test import state
    from dropnet_jax.runs import checkpoint
    hang = False

    def before_commit(tmp):
      if hang:  # all files of the step written; the rename is next
        print('writing', flush=True)
        time.sleep(3600)

    checkpoint._before_commit = before_commit
    ck = checkpoint.Checkpointer(sys.argv[1], max_to_keep=3)
    for k in (1, 2):
      ck.save(*state(k))
    ck.wait()
    hang = True
    ck.save(*state(3))
    time.sleep(3600)
''')


def test_sigkill_before_the_commit_leaves_the_previous_checkpoint_and_a_tmp_dir_that_is_cleaned(tmp_path):
  proc = start_saver(tmp_path, HANGING_SAVER)
  try:
    assert proc.stdout.readline() == 'writing\n', proc.stderr.read() if proc.poll() is not None else ''
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
  finally:
    proc.kill()
  ck_dir = tmp_path / 'ck'
  assert sorted(os.listdir(ck_dir)) == ['1', '2', '3' + TMP_MARKER]
  with Checkpointer(str(ck_dir)) as ck:
    assert not tmp_dirs(ck_dir)
    step, meta, arrays = ck.restore_latest(template)
    assert step == 2
    check_is_state(2, meta, arrays)
    assert ck.save(*state(3)) == 3


# -- the save-cost figures (not a test) ---------------------------------------------------------------


def model_a_state(k: int) -> tuple[dict, dict]:
  """A DropNet driver's checkpoint of Model A (784-40-40-10 MLP, 33,450 params) mid-cycle:
  θ0, the training state's params, best params and momentum, the dense params, masks,
  stat sums and scalars; the meta holds 100 records."""
  shapes = [(784, 40), (40,), (40, 40), (40,), (40, 10), (10,)]
  params = lambda: [jnp.full(s, float(k)) for s in shapes]
  arrays = {'params0': params(), 'masks': [jnp.ones(40), jnp.ones(40)], 'dense_sums': [jnp.zeros(40)] * 4,
            'fit': params() + params() + params() + [jnp.ones(40)] * 6 + [jnp.zeros(2, jnp.uint32)]
            + [jnp.zeros((), jnp.int32)] * 4 + [jnp.zeros(())] * 5, 'dense_params': params()}
  record = {'seed': 0, 'metric': 'min', 'cycle': 3, 'units': [40, 36], 'val_accuracy': 0.9, 'val_loss': 0.3,
            'test_accuracy': 0.9, 'test_loss': 0.3, 'train_loss': 0.2, 'epochs_trained': 40, 'best_epoch': 35,
            'diverged': False, 'seconds': 1.5, 'remaining_fraction': 0.9}
  return arrays, {'version': 1, 'records': [dict(record, cycle=i) for i in range(100)], 'k': k}


def bench(directory: str, n: int = 40) -> None:
  """Median time of a save() call: back to back (an async save then also waits for the
  previous write) and with 0.2 s of other work between saves (the write overlaps it)."""
  import shutil
  print(f'Checkpointer.save of a Model A state: median of {n} save() calls')
  for async_save in (False, True):
    for gap in (0.0, 0.2):
      shutil.rmtree(directory, ignore_errors=True)
      ck = Checkpointer(directory, async_save=async_save)
      for k in range(3):
        ck.save(*model_a_state(k))  # warm-up
      calls = []
      for k in range(n):
        arrays, meta = model_a_state(k)
        t = time.perf_counter()
        ck.save(arrays, meta)
        calls.append(time.perf_counter() - t)
        time.sleep(gap)
      t = time.perf_counter()
      ck.close()
      print(f'  async_save={async_save!s:5} {gap:.1f} s between saves: save() {np.median(calls) * 1e3:6.1f} ms '
            f'(max {max(calls) * 1e3:6.1f}), close() {1e3 * (time.perf_counter() - t):5.1f} ms')


if __name__ == '__main__':
  import tempfile
  from absl import logging
  logging.set_verbosity(logging.WARNING)
  with tempfile.TemporaryDirectory() as d:
    bench(os.path.join(d, 'ck'))
