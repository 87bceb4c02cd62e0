"""Writes of saved params (`runs.tree_save`) under Ctrl-C / SIGTERM and a full disk, the curve files on a full
disk, and a signal that arrives inside a gc callback (`runs.run_dir._sigterm_as_interrupt`).

Each case once ended in tracebacks or a lost interrupt (issue 23): an interrupt left orbax's params write to
its threads, which failed at interpreter shutdown; a full disk printed orbax's thread tracebacks; a SIGTERM
raised inside JAX's gc callback was printed as "Exception ignored" and the run carried on.
"""

import errno
import gc
import logging
import os
import signal
import time
import types

import numpy as np
import orbax.checkpoint as ocp
import pytest

from dropnet_jax.runs import curves, saved_params
from dropnet_jax.runs.checkpoint import TMP_MARKER
from dropnet_jax.runs.run_dir import Terminated, _sigterm_as_interrupt

THETA = {'params': {'Dense_0': {'kernel': np.arange(12, dtype=np.float32).reshape(3, 4),
                                'bias': np.ones(4, np.float32)}}}
SPEC = {'model': 'fc', 'widths': [4], 'num_classes': 2, 'image_shape': [3]}


def _trial(cycle):
  return types.SimpleNamespace(seed=0, metric='min', records=[{'cycle': cycle}])


def _assert_whole(path):
  saved_params.check_manifest(path)
  restored = ocp.StandardCheckpointer().restore(path)
  np.testing.assert_array_equal(restored['params']['Dense_0']['kernel'], THETA['params']['Dense_0']['kernel'])


def test_an_interrupt_during_a_params_write_lands_after_it_is_whole(tmp_path, monkeypatch):
  """Ctrl-C while orbax writes in the background: the write (and its manifest) finishes first, then the
  KeyboardInterrupt is raised; nothing is left in flight or half-written."""
  real_save = ocp.StandardCheckpointer.save

  def save_then_interrupt(self, *args, **kwargs):
    result = real_save(self, *args, **kwargs)  # the write is now in orbax's threads
    os.kill(os.getpid(), signal.SIGINT)
    return result

  monkeypatch.setattr(ocp.StandardCheckpointer, 'save', save_then_interrupt)
  store = saved_params.ParamsStore(str(tmp_path / 'params'), 'all', SPEC)
  with pytest.raises(KeyboardInterrupt):
    store.saved_cycle(_trial(1), THETA)
  path = str(tmp_path / 'params' / 'seed0' / 'min' / 'cycle1')
  assert not os.path.exists(path + TMP_MARKER)
  _assert_whole(path)


def test_the_leftover_of_an_abandoned_write_is_removed_silently(tmp_path, caplog):
  path = tmp_path / 'params' / 'seed0' / 'min' / 'cycle1'
  leftover = path.parent / f'cycle1{TMP_MARKER}'
  leftover.mkdir(parents=True)
  (leftover / 'half_written').write_bytes(b'x' * 10)
  store = saved_params.ParamsStore(str(tmp_path / 'params'), 'all', SPEC)
  with caplog.at_level(logging.WARNING):
    store.saved_cycle(_trial(1), THETA)
  assert not [r for r in caplog.records if r.levelno >= logging.WARNING], [r.getMessage() for r in caplog.records]
  assert not leftover.exists()
  _assert_whole(str(path))


def test_a_full_disk_is_one_oserror_naming_the_checkpoint(tmp_path, monkeypatch):
  """Orbax's failure (tensorstore's long message, raised from its threads) comes back as one OSError with
  the system's errno and the checkpoint's path: what the entry points print in one line. What the failed
  write left is removed."""
  def fail(self):
    raise ValueError('RESOURCE_EXHAUSTED: Error writing local file "/x/cycle1.orbax-checkpoint-tmp/_sharding": '
                     "Failed to write 577 bytes to file 11: No space left on device [os_error_code='28']")

  monkeypatch.setattr(ocp.StandardCheckpointer, 'wait_until_finished', fail)
  store = saved_params.ParamsStore(str(tmp_path / 'params'), 'all', SPEC)
  path = str(tmp_path / 'params' / 'seed0' / 'min' / 'cycle1')
  with pytest.raises(OSError) as failed:
    store.saved_cycle(_trial(1), THETA)
  assert (failed.value.errno, failed.value.filename) == (errno.ENOSPC, path)
  assert not os.path.exists(path + TMP_MARKER) and not os.path.exists(path + saved_params.MANIFEST_SUFFIX)


def test_curve_files_on_a_full_disk_raise_one_named_oserror_and_leave_nothing_running(tmp_path):
  """tensorboardX's last flush fails: close raises an OSError naming the directory, and the writer is
  stopped and marked closed (its atexit hook and thread would otherwise print two more tracebacks)."""
  writer = curves.CurveWriter(str(tmp_path))
  writer.add([{'seed': 0, 'metric': 'min', 'cycle': 0, 'epoch': 1, 'train_loss': 1.0, 'train_accuracy': 0.5,
               'val_loss': 1.0, 'val_accuracy': 0.5, 'lr': 0.1}])
  (events,) = [w.event_writer for w in writer._writers.values()]
  worker = events._worker

  def full(*_):
    raise OSError(errno.ENOSPC, 'No space left on device')

  events._ev_writer.flush = full
  with pytest.raises(OSError) as failed:
    writer.close()
  assert failed.value.errno == errno.ENOSPC and failed.value.filename == events.get_logdir()
  assert events._closed and not worker.is_alive()


def _gc_callback_frame():
  """A frame of a gc callback, as the signal handler sees it when a signal arrives inside one."""
  frames = []

  def callback(phase, info):
    del info
    if phase == 'start' and not frames:
      import sys
      frames.append(sys._getframe())  # pylint: disable=protected-access

  gc.callbacks.append(callback)
  gc.collect()
  return callback, frames[0]


def test_a_signal_inside_a_gc_callback_is_redelivered_not_lost():
  callback, frame = _gc_callback_frame()
  try:
    with pytest.raises(Terminated):
      with _sigterm_as_interrupt():
        handler = signal.getsignal(signal.SIGTERM)
        assert signal.getsignal(signal.SIGINT) is handler  # Ctrl-C is covered the same way
        try:
          handler(signal.SIGTERM, frame)
        except Terminated:
          pytest.fail('raised inside the gc callback, where CPython prints and drops it')
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:  # the signal is sent again, and raised here
          time.sleep(0.01)
        pytest.fail('the signal was lost')
  finally:
    gc.callbacks.remove(callback)
