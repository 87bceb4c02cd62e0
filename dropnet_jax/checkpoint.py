"""Orbax checkpoints of a running experiment: arrays plus a JSON position.

A checkpoint has two items: `arrays` (a pytree of arrays: θ0, the current
masks, a mid-cycle training state, the dense cycle's stat sums) and `meta` (a
JSON object: where the experiment stands and the records so far). The JSON is
read first because it says which arrays exist, and so which restore template
to build.

Cheap saves. By default a save is asynchronous: `save` returns once the arrays
are copied to host memory and orbax writes them in a background thread while
training continues; the next `save`, `wait` and `close` wait for it. The
inputs are snapshotted first (the meta through a JSON round trip, numpy arrays
copied), so the caller may keep mutating its record lists and buffers.

Why a checkpoint on disk is complete or absent, never half-written:
- orbax writes step N into `N.orbax-checkpoint-tmp-*` and renames it to `N`
  only after every file is written (the rename is atomic on a local or NFS
  filesystem), so a SIGKILL or crash at any moment leaves at most a tmp
  directory, which orbax never lists as a step. Opening a Checkpointer deletes
  such leftovers (a run lock keeps two writers off one directory).
- Ctrl-C (SIGINT) during the part of `save` that runs in the caller's thread is
  deferred until that part has finished, then re-delivered: the
  KeyboardInterrupt comes from this module, not from inside orbax, with the
  background write under way. `close()` then finishes it; a second Ctrl-C
  while waiting abandons it, leaving only a tmp directory (see above).
- Old checkpoints beyond `max_to_keep` are deleted only after the new one is
  committed.
Damage after the fact (a file deleted or truncated inside a checkpoint) is
caught on restore: `restore_latest` falls back to the newest readable
checkpoint. A bit flip that keeps every file decodable would not be caught.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging as py_logging
import os
import shutil
import signal
import sys
import threading
import time
import weakref
from typing import Any, Callable, Iterator

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

TMP_MARKER = '.orbax-checkpoint-tmp'  # orbax's suffix for a step that is still being written


class CheckpointError(ValueError):
  """No checkpoint can be read, or a save failed."""


@contextlib.contextmanager
def sigint_deferred() -> Iterator[None]:
  """Holds back Ctrl-C (SIGINT) for the duration of the block, then re-delivers it.

  Python runs signal handlers only in the main thread, so elsewhere this is a
  no-op (a SIGINT then goes to the main thread's handler as usual).
  """
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  received = []
  previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
  try:
    yield
  finally:
    # None: a handler installed outside Python; the default is the closest we can restore.
    signal.signal(signal.SIGINT, previous if previous is not None else signal.SIG_DFL)
    if received:
      signal.raise_signal(signal.SIGINT)  # to the restored handler: KeyboardInterrupt by default


@contextlib.contextmanager
def _quiet_asyncio() -> Iterator[None]:
  """Drops asyncio's 'Task exception was never retrieved' tracebacks while a damaged
  checkpoint is read: orbax leaves failed tasks behind and we report the failure ourselves."""
  log = py_logging.getLogger('asyncio')
  drop = lambda record: 'exception was never retrieved' not in record.getMessage()
  log.addFilter(drop)
  try:
    yield
  finally:
    gc.collect()  # the tracebacks are logged when the abandoned tasks are collected
    log.removeFilter(drop)


def _ignore_closed_loop_callbacks() -> None:
  """After a failed read, orbax has closed its event loop while other tensorstore reads of
  the damaged checkpoint are still in flight; when they finish, their callbacks hit the
  closed loop and Python prints 'Exception ignored ... RuntimeError: Event loop is
  closed' at some later moment. Those (and only those) are dropped from then on."""
  previous = sys.unraisablehook
  if getattr(previous, '_drops_closed_loop_callbacks', False):
    return

  def hook(unraisable):
    e = unraisable.exc_value
    if not (isinstance(e, RuntimeError) and str(e) == 'Event loop is closed'):
      previous(unraisable)

  hook._drops_closed_loop_callbacks = True
  sys.unraisablehook = hook


_open_checkpointers: weakref.WeakSet = weakref.WeakSet()
_exit_hook_registered = False


def _finish_saves_at_exit() -> None:
  """Finishes the saves of Checkpointers nobody closed. It must run before the interpreter
  shuts down the thread pools orbax's background write needs (else the write fails and
  leaves a tmp dir), so it is registered with threading's pre-shutdown hooks, which run
  in reverse order: after the pools' own hook, it runs before it."""
  for ck in list(_open_checkpointers):
    try:
      ck.close()
    except BaseException as e:  # a second Ctrl-C abandons the save: its tmp dir is removed on the next open
      logging.warning('%s: the last checkpoint save was abandoned (%s)', ck.directory, _first_line(e))


def _register_exit_hook() -> None:
  global _exit_hook_registered
  register = getattr(threading, '_register_atexit', None)  # CPython >= 3.9
  if not _exit_hook_registered and register is not None:
    register(_finish_saves_at_exit)
    _exit_hook_registered = True


def _first_line(e: BaseException, limit: int = 200) -> str:
  text = (str(e).strip().splitlines() or [''])[0]
  text = text if len(text) <= limit else text[:limit] + '...'
  return f'{type(e).__name__}: {text}' if text else type(e).__name__


def _snapshot(arrays: dict[str, Any], meta: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
  """Copies of what an asynchronous save still reads after `save` returns. jax arrays are
  immutable (and orbax copies them to the host before returning); numpy arrays and the
  JSON meta (whose record lists the drivers keep appending to) are not."""
  try:
    meta = json.loads(json.dumps(meta, allow_nan=True))
  except TypeError as e:
    raise TypeError(f'checkpoint meta must be JSON-serialisable: {e}') from None
  arrays = jax.tree.map(lambda x: np.array(x, copy=True) if isinstance(x, np.ndarray) else x, arrays)
  return arrays, meta


class Checkpointer:
  """Numbered checkpoints 1, 2, ... in `directory`, keeping the newest `max_to_keep`.

  With `async_save` (the default) `save` returns before the files are written;
  call `close()` (also on KeyboardInterrupt) so the last save is finished (at
  interpreter exit an unclosed Checkpointer's save is finished as a fallback).
  Only one process may write to `directory` at a time (see dropnet_jax.run_lock).
  """

  def __init__(self, directory: str, max_to_keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    self.async_save = async_save
    self._closed = False
    self._pending: int | None = None  # the step an asynchronous save may still be writing
    os.makedirs(self.directory, exist_ok=True)
    if jax.process_index() == 0:
      self.removed_tmp = remove_stale_tmp_dirs(self.directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=('arrays', 'meta'))
    if async_save:
      _open_checkpointers.add(self)
      _register_exit_hook()  # after orbax's imports registered the thread pools' hook

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def all_steps(self) -> list[int]:
    """Steps on disk (or being written), oldest first."""
    return sorted(self.manager.all_steps())

  def latest_step(self) -> int | None:
    """The newest step, including one whose asynchronous write is still under way."""
    return self.manager.latest_step()

  def step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def save(self, arrays: dict[str, Any], meta: dict[str, Any]) -> int:
    """Saves a new checkpoint and returns its step; asynchronous unless `async_save=False`."""
    if self._closed:
      raise CheckpointError(f'{self.directory}: save after close()')
    arrays, meta = _snapshot(arrays, meta)
    self.wait()  # interruptible: a Ctrl-C here leaves the previous save running, then closed
    step = max(self.all_steps(), default=0) + 1
    with sigint_deferred():
      try:
        self.manager.save(step, args=ocp.args.Composite(arrays=ocp.args.StandardSave(arrays),
                                                        meta=ocp.args.JsonSave(meta)))
      except Exception:
        # Failed before any background write began: drop its partial tmp dir, which
        # would block the retry of this step number.
        shutil.rmtree(self.step_dir(step) + TMP_MARKER, ignore_errors=True)
        raise
      self._pending = step
      if not self.async_save:
        self.wait()
    return step

  def wait(self) -> None:
    """Blocks until the previous save is on disk; raises CheckpointError if it failed.

    Polls instead of joining inside orbax so that a Ctrl-C interrupts the wait
    here (orbax would log its own traceback for it) and the save carries on.
    """
    if self._pending is None:
      return  # (orbax's in-progress flag stays set after a save that raised: not to be waited on)
    delay = 0.0005
    while self.manager.is_saving_in_progress():
      time.sleep(delay)
      delay = min(2 * delay, 0.02)
    step, self._pending = self._pending, None
    try:
      self.manager.wait_until_finished()  # the save is done: this only collects its error
    except Exception as e:
      shutil.rmtree(self.step_dir(step) + TMP_MARKER, ignore_errors=True)  # so that a retry can use the number
      raise CheckpointError(f'{self.directory}: saving checkpoint {step} failed: {_first_line(e)}') from e

  def restore_meta(self, step: int | None = None) -> dict[str, Any] | None:
    self.wait()
    step = self.latest_step() if step is None else step
    if step is None:
      return None
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']

  def restore_arrays(self, template: dict[str, Any], step: int | None = None) -> dict[str, Any]:
    self.wait()
    step = self.latest_step() if step is None else step
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
    return self.manager.restore(step, args=ocp.args.Composite(arrays=ocp.args.StandardRestore(abstract)))['arrays']

  def restore_latest(self, make_template: Callable[[dict[str, Any]], dict[str, Any]]
                     ) -> tuple[int, dict[str, Any], dict[str, Any]] | None:
    """(step, meta, arrays) of the newest readable checkpoint, or None when there is none.

    Steps are tried newest first: the meta is read, `make_template(meta)` gives
    the arrays' restore template (its exceptions propagate: it is the caller's
    judgement of the meta), then the arrays are read. An unreadable step (a
    file missing, truncated or undecodable) is skipped with one warning naming
    it; if every step is unreadable, CheckpointError says so in one line.
    """
    self.wait()
    steps = sorted(self.all_steps(), reverse=True)
    if not steps:
      return None
    error = None
    for step in steps:
      try:
        with _quiet_asyncio():
          meta = self.restore_meta(step)
      except Exception as e:  # any read failure; never a KeyboardInterrupt
        error = self._warn_unreadable(step, e)
        continue
      template = make_template(meta)
      try:
        with _quiet_asyncio():
          arrays = self.restore_arrays(template, step)
      except Exception as e:
        error = self._warn_unreadable(step, e)
        continue
      return step, meta, arrays
    raise CheckpointError(f'none of the {len(steps)} checkpoints in {self.directory} is readable '
                          f'(steps {", ".join(map(str, steps))}; the oldest: {error}); '
                          'move the directory away to start afresh')

  def _warn_unreadable(self, step: int, e: Exception) -> str:
    _ignore_closed_loop_callbacks()
    error = _first_line(e)
    logging.warning('checkpoint %s is unreadable (%s); falling back to an older one', self.step_dir(step), error)
    return error

  def close(self) -> None:
    """Finishes the last save (waiting for it) and releases orbax's resources; idempotent."""
    if self._closed:
      return
    self.wait()
    self._closed = True
    _open_checkpointers.discard(self)
    self.manager.close()


def remove_stale_tmp_dirs(directory: str) -> list[str]:
  """Deletes the `*.orbax-checkpoint-tmp*` directories a killed save left in `directory`
  (they are never complete checkpoints); returns their paths. Only safe while no save
  into `directory` is running, i.e. under the run lock and before this process saves."""
  removed = []
  for name in sorted(os.listdir(directory)):
    path = os.path.join(directory, name)
    if TMP_MARKER in name and os.path.isdir(path) and not os.path.islink(path):
      shutil.rmtree(path, ignore_errors=True)
      removed.append(path)
  if removed:
    logging.info('removed %d unfinished checkpoint(s) left by an interrupted save: %s', len(removed),
                 ', '.join(removed))
  return removed
