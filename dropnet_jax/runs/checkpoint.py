"""Checkpoints of a running experiment through orbax's `CheckpointManager`: arrays plus a JSON position.

A checkpoint is orbax step `<step>/` with two items: `arrays` (`args.StandardSave`: θ0, masks, a
mid-cycle training state, stat sums) and `meta` (`args.JsonSave`: where the experiment stands and the
records so far). The meta is read first because it says which arrays exist, and so which restore
template to build.

Why orbax, and when it saves. Orbax gives the atomic commit (a step is written into
`<step>.orbax-checkpoint-tmp` and renamed; `cleanup_tmp_directories` deletes what a killed save
left), asynchronous writes, retention (`max_to_keep`) and several hosts' saves. Its fixed cost is
90-120 ms per save on a 2-core CPU (15-25 ms of it blocking the caller), which made checkpoints after
every epoch of a small model 24x slower (BUILD_NOTES): an earlier version of this module wrote a
format of its own for that reason. Now the cost is made irrelevant by saving seldom. The loop
`offer`s its position at every epoch and cycle boundary, and an offer is saved when:
  * `interval_s` seconds have passed since the newest checkpoint (orbax's
    `ContinuousCheckpointingPolicy`; `--checkpoint_interval_s`, default 60), or
  * it is forced (`--checkpoint_every_epochs`, for tests and for very long epochs), or
  * with `interval_s=0`, it is a cycle boundary (a checkpoint after every cycle);
otherwise it is kept in memory (references to immutable jax arrays, copies of the record lists;
under 1 ms per epoch with the saves: 1.4 % of the Model A MNIST six-metric run, BUILD_NOTES). Keeping
it keeps the previous epoch's training state alive, one more copy of it in device memory.
`save_unsaved` writes the kept one: on Ctrl-C or SIGTERM (so an interrupted run loses at most the
epoch in progress) and at the end of the run. The jitted steps donate no buffers; one that did would
invalidate the kept references.

Ctrl-C and SIGTERM are held back while orbax's synchronous part of a save runs (copying to host,
starting the writers) and re-delivered after it, so an interrupt never leaves orbax half set up.

Failures. A failed write (a full disk) comes back from orbax's threads as one CheckpointError line;
orbax's own error logs and its threads' stray tracebacks are silenced while a Checkpointer is open
(`_quiet_orbax`). On restore, an unreadable newest step (a file deleted or truncated) is skipped with
one warning and the newest readable one is used. Orbax keeps no checksums of the array data, so a
bit flipped inside a data file may go unnoticed (the earlier format's CRCs caught it).

Several processes (`--distributed`): every process calls the same offers and saves (orbax's barriers;
the interval is decided on process 0 and broadcast by orbax's policy); each process's copy of the
loop's replicated arrays is saved as host numpy, so process 0 alone writes it. On an interrupt only
the save in flight is finished there (the processes may not all have been signalled).

Checkpoints of the earlier format (`<step>/arrays.bin`) are not read; a directory holding them is
refused in one line.
"""

from __future__ import annotations

import contextlib
import json
import logging as py_logging
import os
import re
import signal
import sys
import threading
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

import orbax.checkpoint as ocp

TMP_MARKER = '.orbax-checkpoint-tmp'  # orbax's name for a step being written
META_ITEM, ARRAYS_ITEM = 'meta', 'arrays'
OLD_FORMAT_FILE = 'arrays.bin'  # the earlier, own format's array file


class CheckpointError(ValueError):
  """No checkpoint can be read, or a save failed."""


@contextlib.contextmanager
def signals_deferred(signums=(signal.SIGINT, signal.SIGTERM)) -> Iterator[None]:
  """Holds back Ctrl-C (SIGINT) and SIGTERM for the duration of the block, then re-delivers them.

  Python runs signal handlers only in the main thread, so elsewhere this is a no-op.
  """
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  received: list[int] = []
  previous = {s: signal.signal(s, lambda signum, frame: received.append(signum)) for s in signums}
  try:
    yield
  finally:
    for s, handler in previous.items():
      # None: a handler installed outside Python; the default is the closest we can restore.
      signal.signal(s, handler if handler is not None else signal.SIG_DFL)
    for s in dict.fromkeys(received):
      signal.raise_signal(s)  # to the restored handler: KeyboardInterrupt / Terminated


def _first_line(e: BaseException, limit: int = 200) -> str:
  text = (str(e).strip().splitlines() or [''])[0]
  text = text if len(text) <= limit else text[:limit] + '...'
  return f'{type(e).__name__}: {text}' if text else type(e).__name__


def _reason(e: BaseException) -> str:
  """One line for a failed save: the operating system's reason when tensorstore gives one (its messages
  are long paths inside the step being written), else the exception's first line."""
  found = re.search(r'([^:]+?) \[os_error_code=.?(\d+)', str(e))
  return f'{found.group(1).strip()} (errno {found.group(2)})' if found else _first_line(e)


class _DropOrbaxErrors(py_logging.Filter):
  """Drops orbax's ERROR records (tracebacks of its threads): the Checkpointer reports the failure."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    orbax = f'{os.sep}orbax{os.sep}'
    # asyncio's "Task/Future exception was never retrieved" (orbax's writers of a failed save, garbage-collected)
    # comes from asyncio's logger and names the orbax coroutine or the step being written in its message.
    message = record.getMessage()
    return not (record.levelno >= py_logging.ERROR and (orbax in record.pathname or orbax in message
                                                         or TMP_MARKER in message))


_QUIET_LOGGERS = ('absl', 'asyncio')


def _is_orbax_noise(exc: BaseException | None, obj: Any = None) -> bool:
  """A stray exception of orbax's event loops (a tensorstore callback into a closed loop, a coroutine
  of a failed read never awaited): nothing the user can act on."""
  if isinstance(exc, RuntimeError) and 'Event loop is closed' in str(exc):
    return True
  code = getattr(obj, 'cr_code', None)
  return code is not None and f'{os.sep}orbax{os.sep}' in code.co_filename


_quiet_depth = 0
_quiet_lock = threading.Lock()
_saved_hooks: list[Any] = []


@contextlib.contextmanager
def _quiet_orbax() -> Iterator[None]:
  """While any Checkpointer is open: orbax's error logs and its stray thread exceptions are silent."""
  global _quiet_depth
  with _quiet_lock:
    _quiet_depth += 1
    if _quiet_depth == 1:
      flt = _DropOrbaxErrors()
      excepthook, unraisablehook = sys.excepthook, sys.unraisablehook
      sys.excepthook = lambda t, v, tb: None if _is_orbax_noise(v) else excepthook(t, v, tb)
      sys.unraisablehook = lambda u: None if _is_orbax_noise(u.exc_value, u.object) else unraisablehook(u)
      for name in _QUIET_LOGGERS:
        py_logging.getLogger(name).addFilter(flt)
      _saved_hooks[:] = [excepthook, unraisablehook, flt]
  try:
    yield
  finally:
    with _quiet_lock:
      _quiet_depth -= 1
      if _quiet_depth == 0:
        sys.excepthook, sys.unraisablehook, flt = _saved_hooks
        for name in _QUIET_LOGGERS:
          py_logging.getLogger(name).removeFilter(flt)


class Checkpointer:
  """Numbered checkpoints in `directory` through an orbax CheckpointManager, keeping the newest
  `max_to_keep`; the save policy (`interval_s`, forced saves, `save_unsaved`) is the module docstring's.

  Call `close()` (also on KeyboardInterrupt) so that a failed last write is reported. Only one run
  may write to `directory` at a time (see dropnet_jax.runs.lock).
  """

  def __init__(self, directory: str, max_to_keep: int = 3, interval_s: float = 0.0, async_save: bool = True):
    if max_to_keep < 1:
      raise ValueError(f'max_to_keep must be >= 1, got {max_to_keep}')
    if not interval_s >= 0:
      raise ValueError(f'interval_s must be >= 0, got {interval_s}')
    self.directory = os.path.abspath(directory)
    self.max_to_keep, self.interval_s = max_to_keep, float(interval_s)
    os.makedirs(self.directory, exist_ok=True)
    old = old_format_error(self.directory)
    if old:
      raise CheckpointError(old)
    self._quiet = _quiet_orbax()
    self._quiet.__enter__()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, enable_async_checkpointing=async_save, cleanup_tmp_directories=True,
        # The decision must not depend on whether a save is still running, or it would not be repeatable.
        enable_should_save_is_saving_in_progress_check=False,
        save_decision_policy=ocp.checkpoint_managers.ContinuousCheckpointingPolicy(
            minimum_interval_secs=self.interval_s))
    try:
      self._manager = ocp.CheckpointManager(
          self.directory, options=options, item_names=(ARRAYS_ITEM, META_ITEM),
          item_handlers={ARRAYS_ITEM: ocp.StandardCheckpointHandler(), META_ITEM: ocp.JsonCheckpointHandler()})
    except BaseException:
      self._quiet.__exit__(None, None, None)
      raise
    if hasattr(self._manager, '_maybe_await_cleanup_tmp_directory'):  # the clean-up runs in a thread: await it
      self._manager._maybe_await_cleanup_tmp_directory()  # pylint: disable=protected-access
    self._unsaved: tuple[dict[str, Any], dict[str, Any]] | None = None
    self._next = (self._manager.latest_step() or 0) + 1
    self._closed = False

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  # -- steps ----------------------------------------------------------------------------------

  def all_steps(self) -> list[int]:
    """Steps on disk, plus one whose asynchronous write is under way; oldest first."""
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    steps = self.all_steps()
    return steps[-1] if steps else None

  def step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  # -- saving ---------------------------------------------------------------------------------

  def offer(self, arrays: dict[str, Any], meta: dict[str, Any], *, force: bool = False, cycle_end: bool = False
            ) -> bool:
    """The position at an epoch (or, `cycle_end`, a cycle) boundary: saved now if forced or due (module
    docstring), else kept for `save_unsaved`. True when it was saved."""
    with signals_deferred():
      if force or (cycle_end if self.interval_s == 0 else self._manager.should_save(self._next)):
        self._unsaved = None
        self.save(arrays, meta)
        return True
      self._unsaved = (arrays, meta)
      return False

  def save_unsaved(self) -> int | None:
    """Saves the newest offered position that was not saved (on an interrupt, at the end); its step."""
    with signals_deferred():
      found, self._unsaved = self._unsaved, None
      return self.save(*found) if found is not None else None

  def save(self, arrays: dict[str, Any], meta: dict[str, Any]) -> int:
    """Saves a new checkpoint now and returns its step (asynchronous unless `async_save=False`)."""
    if self._closed:
      raise CheckpointError(f'{self.directory}: save after close()')
    try:
      json.dumps(meta)
    except (TypeError, ValueError) as e:
      raise TypeError(f'checkpoint meta must be JSON-serialisable: {e}') from None
    step = self._next
    if jax.process_count() > 1:
      arrays = _host_copies(arrays)
    with signals_deferred():
      try:
        self._manager.save(step, args=ocp.args.Composite(**{
            ARRAYS_ITEM: ocp.args.StandardSave(arrays), META_ITEM: ocp.args.JsonSave(meta)}), force=True)
      except Exception as e:  # the previous save failed (reported by the wait inside save), or this one
        raise CheckpointError(f'{self.directory}: saving a checkpoint failed: {_reason(e)}') from e
      self._next = step + 1
    return step

  def wait(self) -> None:
    """Blocks until the previous save is on disk; raises CheckpointError (one line) if it failed."""
    try:
      self._manager.wait_until_finished()
    except Exception as e:
      self._manager.reload()  # forget the failed step
      raise CheckpointError(f'{self.directory}: saving a checkpoint failed: {_reason(e)}') from e

  def close(self) -> None:
    """Finishes the last save (waiting for it) and releases orbax's threads; idempotent."""
    if self._closed:
      return
    self._closed = True
    try:
      self.wait()
    finally:
      try:
        self._manager.close()
      except Exception:  # pylint: disable=broad-except
        pass  # the failure, if any, was reported by wait()
      self._quiet.__exit__(None, None, None)

  # -- restoring ------------------------------------------------------------------------------

  def restore_meta(self, step: int | None = None) -> dict[str, Any] | None:
    self.wait()
    step = self.latest_step() if step is None else step
    if step is None:
      return None
    restored = self._manager.restore(step, args=ocp.args.Composite(**{META_ITEM: ocp.args.JsonRestore()}))
    meta = restored[META_ITEM]
    if not isinstance(meta, dict):
      raise CheckpointError(f'{self.step_dir(step)}: no meta item')
    return meta

  def restore_arrays(self, template: dict[str, Any], step: int | None = None) -> dict[str, Any]:
    """The arrays of `step` (default: the newest) in the structure of `template`, whose leaves (arrays
    or jax.ShapeDtypeStruct) give the expected shapes and dtypes (orbax refuses others). jax leaves
    come back as jax arrays, numpy leaves as numpy arrays."""
    self.wait()
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f'{self.directory}: no checkpoint to restore')
    abstract = jax.tree.map(lambda t: jax.ShapeDtypeStruct(t.shape, t.dtype), template)
    restored = self._manager.restore(step, args=ocp.args.Composite(**{ARRAYS_ITEM: ocp.args.StandardRestore(abstract)}))
    got = restored[ARRAYS_ITEM]
    if jax.tree.structure(got) != jax.tree.structure(template):
      raise CheckpointError(f'{self.step_dir(step)}: arrays differ from the template')
    for (path, a), t in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(template)):
      if tuple(a.shape) != tuple(t.shape) or jnp.dtype(a.dtype) != jnp.dtype(t.dtype):
        raise CheckpointError(f'{self.step_dir(step)}: {jax.tree_util.keystr(path)} is {jnp.dtype(a.dtype).name}'
                              f'{list(a.shape)}, expected {jnp.dtype(t.dtype).name}{list(t.shape)}')
    return jax.tree.map(_like, got, template)

  def restore_latest(self, make_template: Callable[[dict[str, Any]], dict[str, Any]]
                     ) -> tuple[int, dict[str, Any], dict[str, Any]] | None:
    """(step, meta, arrays) of the newest readable checkpoint, or None when there is none.

    Steps are tried newest first: the meta is read, `make_template(meta)` gives the arrays' restore
    template (its exceptions propagate: it is the caller's judgement of the meta), then the arrays are
    read. An unreadable step (a file missing, truncated or corrupt) is skipped with one warning naming
    it; if every step is unreadable, CheckpointError says so in one line.
    """
    self.wait()
    steps = self.all_steps()[::-1]
    if not steps:
      return None
    error = ''
    for step in steps:
      try:
        meta = self.restore_meta(step)
      except Exception as e:  # any read failure; never a KeyboardInterrupt
        error = self._warn_unreadable(step, e)
        continue
      template = make_template(meta)
      try:
        return step, meta, self.restore_arrays(template, step)
      except Exception as e:
        error = self._warn_unreadable(step, e)
    raise CheckpointError(f'none of the {len(steps)} checkpoints in {self.directory} is readable '
                          f'(steps {", ".join(map(str, steps))}; the oldest: {error}); '
                          'move the directory away to start afresh')

  def _warn_unreadable(self, step: int, e: Exception) -> str:
    error = _first_line(e)
    logging.warning('checkpoint %s is unreadable (%s); falling back to an older one', self.step_dir(step), error)
    return error


def _host_copies(arrays: dict[str, Any]) -> dict[str, Any]:
  """Several processes: each holds its own copy of the loop's (replicated) arrays, which orbax cannot save as
  jax arrays (they are not one global array); as numpy arrays they are written by the primary process alone.
  An array split over processes is gathered."""
  def fetchable(x):
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
      return x
    if x.is_fully_replicated:
      return x.addressable_data(0)
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return multihost_utils.process_allgather(x, tiled=True)
  return jax.tree.map(np.asarray, jax.device_get(jax.tree.map(fetchable, arrays)))


def _like(a: Any, t: Any) -> Any:
  if isinstance(t, np.ndarray):
    return np.array(a)  # writable
  return a if isinstance(a, jax.Array) else jnp.asarray(a)


def _steps_on_disk(directory: str) -> list[int]:
  return sorted((int(n) for n in os.listdir(directory)
                 if n.isdigit() and os.path.isdir(os.path.join(directory, n))), reverse=True)


def old_format_error(directory: str) -> str | None:
  """The one line refusing `directory` when it holds checkpoints of the earlier, own format; else None."""
  if not os.path.isdir(directory):
    return None
  old = [s for s in _steps_on_disk(directory) if os.path.exists(os.path.join(directory, str(s), OLD_FORMAT_FILE))]
  if not old:
    return None
  return (f'{directory} holds checkpoints of the format of older versions (step {old[0]}: {OLD_FORMAT_FILE}), which '
          'this version does not read; finish that run with the older version, or move the directory away')


def newest_meta(directory: str) -> dict[str, Any] | None:
  """The meta of the newest checkpoint in `directory` whose meta reads, without opening a Checkpointer
  (nothing is written or cleaned up): for checks made before a run starts."""
  if not os.path.isdir(directory):
    return None
  for step in _steps_on_disk(directory):
    try:
      with open(os.path.join(directory, str(step), META_ITEM, 'metadata'), encoding='utf-8') as f:
        return json.load(f)
    except (OSError, ValueError):
      continue
  return None
