"""Checkpoints of a running experiment: arrays plus a JSON position, cheap enough for every epoch.

A checkpoint is a directory `<step>/` holding `arrays.bin` (the pytree's leaves
with their tree paths, dtypes, shapes and CRC-32s: θ0, masks, a mid-cycle
training state, stat sums) and `meta.json` (where the experiment stands and the
records so far). The JSON is read first because it says which arrays exist, and
so which restore template to build.

Why not orbax: its fixed cost per save (threads, an event loop, barriers,
metadata files, tensorstore) was 90-120 ms for a Model A state in a digits run
on this 2-core CPU, which made `--checkpoint_every_epochs=1` runs 24x slower
(BUILD_NOTES). These states are small and replicated: one file of raw bytes
written by a background thread costs the caller 1-4 ms per save there.

Cheap saves. By default a save is asynchronous: `save` copies the arrays to host
memory and serialises the meta (so the caller may go on mutating its buffers and
record lists), then a background thread writes and commits the files while
training continues; the next `save`, `wait` and `close` wait for it.

Why a checkpoint on disk is complete or absent, never half-written:
- step N is written into `N.tmp`, then renamed to `N` (an atomic rename on a
  local or NFS filesystem). A SIGKILL or crash of the process at any moment
  leaves at most a `*.tmp` directory, which is never listed as a step and is
  deleted when a Checkpointer is next opened (the run lock keeps two writers off
  one directory). Old steps beyond `max_to_keep` are deleted only after the new
  one is committed, each renamed to `N.tmp-deleting` first so that a kill
  mid-deletion leaves no partial step.
- Ctrl-C (SIGINT) during the part of `save` that runs in the caller's thread is
  deferred until that part has finished and then re-delivered, so the
  KeyboardInterrupt never leaves an unaccounted write. The writer thread is not
  a daemon: `close()` (or, failing that, interpreter exit) finishes its commit;
  a second Ctrl-C while waiting abandons it, leaving only a `*.tmp` directory.
- Power loss or a kernel crash may reach the disk with the rename but not the
  files' contents. `fsync=True` syncs files and directories around the commit
  (about 20 ms more per save here, more than a small model's epoch); without it
  such damage is caught on restore like any other.
Damage is caught on restore: the header and every leaf carry a CRC-32, the
file's length must match the header, and the JSON must parse, so a file
deleted, truncated or bit-flipped makes the step unreadable, and
`restore_latest` falls back to the newest readable step.

Several hosts (untested here): every process calls `save` (arrays that are not
fully addressable are gathered), only process 0 writes.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import struct
import threading
import zlib
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

TMP_MARKER = '.tmp'  # a step being written (`N.tmp`) or deleted (`N.tmp-deleting`)
LEGACY_TMP_MARKER = '.orbax-checkpoint-tmp'  # left by the orbax-based version of this module
ARRAYS_FILE, META_FILE = 'arrays.bin', 'meta.json'
MAGIC = b'dropnet_jax checkpoint arrays v1\n'


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


def _first_line(e: BaseException, limit: int = 200) -> str:
  text = (str(e).strip().splitlines() or [''])[0]
  text = text if len(text) <= limit else text[:limit] + '...'
  return f'{type(e).__name__}: {text}' if text else type(e).__name__


def _to_host(leaves: list[Any]) -> list[np.ndarray]:
  """Host copies of the leaves (copies even of numpy input: the caller may mutate it, or a
  later jitted step may donate a device buffer, while the write is pending)."""
  def fetchable(x):
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
      return x
    if x.is_fully_replicated:  # several hosts: any local replica is the value
      return x.addressable_data(0)
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return multihost_utils.process_allgather(x, tiled=True)
  # One device_get for all: it starts every device-to-host copy before waiting for any.
  return [np.array(h) for h in jax.device_get([fetchable(x) for x in leaves])]


def _encode_arrays(paths: list[str], leaves: list[np.ndarray]) -> list[Any]:
  """The chunks of an `arrays.bin`: MAGIC, the header's length (u64), the header (JSON:
  [tree path, dtype, shape, bytes, CRC-32] per leaf), the header's CRC-32 (u32), then each
  leaf's bytes (C order, native byte order). Done in the caller's thread (about 0.3 ms
  for Model A), so that the writer thread only makes system calls and seldom takes the
  GIL from the training loop."""
  datas = [np.ascontiguousarray(a, dtype=a.dtype.newbyteorder('=')).reshape(-1).view(np.uint8) for a in leaves]
  header = json.dumps([[p, a.dtype.name, list(a.shape), d.nbytes, zlib.crc32(d)]
                       for p, a, d in zip(paths, leaves, datas)]).encode()
  return [MAGIC + struct.pack('<Q', len(header)) + header + struct.pack('<I', zlib.crc32(header)), *datas]


def _write_arrays(path: str, chunks: list[Any], fsync: bool) -> None:
  with open(path, 'wb') as f:
    for c in chunks:
      f.write(c)
    if fsync:
      f.flush()
      os.fsync(f.fileno())


def _read_arrays(path: str) -> tuple[list, list[memoryview]]:
  """(header, each leaf's bytes) of an `arrays.bin`; CheckpointError if it is damaged."""
  with open(path, 'rb') as f:
    data = memoryview(f.read())
  start = len(MAGIC) + 8
  if len(data) < start or data[:len(MAGIC)] != MAGIC:
    raise CheckpointError(f'{path}: not an arrays file (or truncated)')
  (size,) = struct.unpack('<Q', data[len(MAGIC):start])
  header_bytes, crc_bytes = data[start:start + size], data[start + size:start + size + 4]
  if len(crc_bytes) < 4 or struct.unpack('<I', crc_bytes)[0] != zlib.crc32(header_bytes):
    raise CheckpointError(f'{path}: damaged header')
  header = json.loads(bytes(header_bytes))
  offset, leaves = start + size + 4, []
  for name, _, _, nbytes, crc in header:
    leaf = data[offset:offset + nbytes]
    if len(leaf) < nbytes or zlib.crc32(leaf) != crc:
      raise CheckpointError(f'{path}: {name} is truncated or damaged')
    leaves.append(leaf)
    offset += nbytes
  if offset != len(data):
    raise CheckpointError(f'{path}: {len(data) - offset} unexpected trailing bytes')
  return header, leaves


def _write_file(path: str, data: bytes, fsync: bool) -> None:
  with open(path, 'wb') as f:
    f.write(data)
    if fsync:
      f.flush()
      os.fsync(f.fileno())


def _before_commit(tmp: str) -> None:
  """A hook for tests (a kill between the last write and the rename)."""


def _fsync_dir(path: str) -> None:
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


class Checkpointer:
  """Numbered checkpoints 1, 2, ... in `directory`, keeping the newest `max_to_keep`.

  With `async_save` (the default) `save` returns before the files are written;
  call `close()` (also on KeyboardInterrupt) so that a failed last write is
  reported (interpreter exit also waits for it). Only one process may write to
  `directory` at a time (see dropnet_jax.runs.lock).
  """

  def __init__(self, directory: str, max_to_keep: int = 3, async_save: bool = True, fsync: bool = False):
    if max_to_keep < 1:
      raise ValueError(f'max_to_keep must be >= 1, got {max_to_keep}')
    self.directory = os.path.abspath(directory)
    self.max_to_keep = max_to_keep
    self.async_save = async_save
    self.fsync = fsync
    self._writes = jax.process_index() == 0
    self._closed = False
    self._pending: tuple[int, threading.Thread, threading.Event, list] | None = None  # step, writer, done, [error]
    os.makedirs(self.directory, exist_ok=True)
    self.removed_tmp = remove_stale_tmp_dirs(self.directory) if self._writes else []

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  @property
  def manager(self) -> Checkpointer:
    """Deprecated alias from the orbax version: `checkpointer.manager.directory` still works."""
    return self

  # -- steps ----------------------------------------------------------------------------------

  def all_steps(self) -> list[int]:
    """Committed steps on disk, plus one whose asynchronous write is under way; oldest first."""
    steps = {int(n) for n in os.listdir(self.directory)
             if n.isdigit() and os.path.isdir(os.path.join(self.directory, n))}
    if self._pending is not None:
      steps.add(self._pending[0])
    return sorted(steps)

  def latest_step(self) -> int | None:
    steps = self.all_steps()
    return steps[-1] if steps else None

  def step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  # -- saving ---------------------------------------------------------------------------------

  def save(self, arrays: dict[str, Any], meta: dict[str, Any]) -> int:
    """Saves a new checkpoint and returns its step; asynchronous unless `async_save=False`."""
    if self._closed:
      raise CheckpointError(f'{self.directory}: save after close()')
    try:
      meta_text = json.dumps(meta)  # now: the caller keeps appending to its record lists
    except (TypeError, ValueError) as e:
      raise TypeError(f'checkpoint meta must be JSON-serialisable: {e}') from None
    self.wait()  # interruptible: a Ctrl-C here leaves the previous write to finish at exit
    with sigint_deferred():
      flat, _ = jax.tree_util.tree_flatten_with_path(arrays)
      paths = [jax.tree_util.keystr(p) for p, _ in flat]
      chunks = _encode_arrays(paths, _to_host([x for _, x in flat]))
      step = max(self.all_steps(), default=0) + 1
      if not self._writes:
        return step
      done, error = threading.Event(), []
      writer = threading.Thread(target=self._write, args=(step, chunks, meta_text, done, error),
                                name=f'checkpoint-{step}', daemon=False)
      writer.start()
      self._pending = (step, writer, done, error)
    if not self.async_save:
      self.wait()
    return step

  def _write(self, step: int, chunks: list[Any], meta_text: str, done: threading.Event,
             error: list[BaseException]) -> None:
    """The background half of a save: write, commit, then drop the oldest steps."""
    try:
      tmp = self.step_dir(step) + TMP_MARKER
      shutil.rmtree(tmp, ignore_errors=True)
      os.mkdir(tmp)
      _write_arrays(os.path.join(tmp, ARRAYS_FILE), chunks, self.fsync)
      _write_file(os.path.join(tmp, META_FILE), meta_text.encode(), self.fsync)
      if self.fsync:
        _fsync_dir(tmp)
      _before_commit(tmp)
      os.rename(tmp, self.step_dir(step))  # the commit
      if self.fsync:
        _fsync_dir(self.directory)
    except BaseException as e:  # reported by wait(), in the caller's thread
      error.append(e)
      done.set()
      return
    try:
      committed = sorted(int(n) for n in os.listdir(self.directory) if n.isdigit())
      for old in committed[:-self.max_to_keep]:
        trash = self.step_dir(old) + TMP_MARKER + '-deleting'
        os.rename(self.step_dir(old), trash)
        shutil.rmtree(trash, ignore_errors=True)
    except OSError as e:  # the new checkpoint is safe; an old one lingers until the next save
      logging.warning('%s: could not delete an old checkpoint (%s)', self.directory, _first_line(e))
    finally:
      done.set()

  def wait(self) -> None:
    """Blocks until the previous save is on disk; raises CheckpointError if it failed."""
    if self._pending is None:
      return
    step, writer, done, error = self._pending
    # An Event, not writer.join(): a KeyboardInterrupt inside join() makes CPython 3.11 mark
    # the still-running writer as stopped, and interpreter exit then cuts its write short.
    while not done.wait(0.1):
      pass
    with sigint_deferred():
      writer.join()  # returns at once: the writer has finished
      self._pending = None
    if error:
      shutil.rmtree(self.step_dir(step) + TMP_MARKER, ignore_errors=True)
      raise CheckpointError(f'{self.directory}: saving checkpoint {step} failed: {_first_line(error[0])}'
                            ) from error[0]

  def close(self) -> None:
    """Finishes the last save (waiting for it); idempotent."""
    if not self._closed:
      self._closed = True
      self.wait()

  # -- restoring ------------------------------------------------------------------------------

  def restore_meta(self, step: int | None = None) -> dict[str, Any] | None:
    self.wait()
    step = self.latest_step() if step is None else step
    if step is None:
      return None
    path = os.path.join(self.step_dir(step), META_FILE)
    if not os.path.exists(path) and os.path.isdir(os.path.join(self.step_dir(step), 'meta')):
      raise CheckpointError(f'{self.step_dir(step)} is in the orbax layout of older versions, '
                            'which this version does not read')
    with open(path, encoding='utf-8') as f:
      return json.load(f)

  def restore_arrays(self, template: dict[str, Any], step: int | None = None) -> dict[str, Any]:
    """The arrays of `step` (default: the newest) in the structure of `template`, whose
    leaves (arrays or jax.ShapeDtypeStruct) give the expected shapes and dtypes. jax
    leaves come back as jax arrays (on the template's sharding when it has one), numpy
    leaves as numpy arrays."""
    self.wait()
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f'{self.directory}: no checkpoint to restore')
    flat, treedef = jax.tree_util.tree_flatten_with_path(template)
    path = os.path.join(self.step_dir(step), ARRAYS_FILE)
    header, data = _read_arrays(path)
    want, have = [jax.tree_util.keystr(p) for p, _ in flat], [h[0] for h in header]
    if want != have:
      missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
      raise CheckpointError(f'{path}: arrays differ from the template (missing {missing[:3]}, '
                            f'unexpected {extra[:3]})')
    leaves = []
    for (name, dtype, shape, _, _), (_, t), d in zip(header, flat, data):
      if tuple(shape) != tuple(t.shape) or jnp.dtype(dtype) != jnp.dtype(t.dtype).newbyteorder('='):
        raise CheckpointError(f'{path}: {name} is {dtype}{shape}, expected {jnp.dtype(t.dtype).name}{list(t.shape)}')
      leaves.append(_like(np.frombuffer(d, jnp.dtype(dtype)).reshape(shape), t))
    return jax.tree_util.tree_unflatten(treedef, leaves)

  def restore_latest(self, make_template: Callable[[dict[str, Any]], dict[str, Any]]
                     ) -> tuple[int, dict[str, Any], dict[str, Any]] | None:
    """(step, meta, arrays) of the newest readable checkpoint, or None when there is none.

    Steps are tried newest first: the meta is read, `make_template(meta)` gives
    the arrays' restore template (its exceptions propagate: it is the caller's
    judgement of the meta), then the arrays are read. An unreadable step (a
    file missing, truncated or corrupt) is skipped with one warning naming it;
    if every step is unreadable, CheckpointError says so in one line.
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


def _like(a: np.ndarray, t: Any) -> Any:
  if isinstance(t, np.ndarray):
    return a.copy()  # writable, and not a view of the whole file's bytes
  sharding = getattr(t, 'sharding', None)
  return jax.device_put(a, sharding) if sharding is not None else jnp.asarray(a)


def newest_meta(directory: str) -> dict[str, Any] | None:
  """The meta of the newest checkpoint in `directory` whose meta.json reads, without opening a
  Checkpointer (nothing is written or cleaned up): for checks made before a run starts."""
  if not os.path.isdir(directory):
    return None
  steps = sorted((int(n) for n in os.listdir(directory) if n.isdigit()), reverse=True)
  for step in steps:
    try:
      with open(os.path.join(directory, str(step), META_FILE)) as f:
        return json.load(f)
    except (OSError, ValueError):
      continue
  return None


def remove_stale_tmp_dirs(directory: str) -> list[str]:
  """Deletes the `*.tmp*` directories a killed save or deletion left in `directory` (never
  complete checkpoints); returns their paths. Only safe while no save into `directory`
  is running, i.e. under the run lock and before this process saves."""
  removed = []
  for name in sorted(os.listdir(directory)):
    path = os.path.join(directory, name)
    if (TMP_MARKER in name or LEGACY_TMP_MARKER in name) and os.path.isdir(path) and not os.path.islink(path):
      shutil.rmtree(path, ignore_errors=True)
      removed.append(path)
  if removed:
    logging.info('removed %d unfinished checkpoint(s) left by an interrupted save: %s', len(removed),
                 ', '.join(removed))
  return removed
