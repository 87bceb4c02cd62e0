"""The one owner of a run's output directory (`--out`), for every entry point.

Why one class: every entry point writes somewhere, and each used to check (or not check) its
directory its own way, after the work in some cases. `RunDir` does, for all of them:

  * every check before any work (`check`): `--out` is a file; it is not writable; it holds another
    kind of run, or a run of this kind with other settings or data (its config.json, and also its
    checkpoints' own stamp when config.json was deleted or edited); it holds results but no
    config.json; it is the directory of one of the run's inputs (`inputs`: e.g. the DropNet run an
    ensemble reads); each refusal is one line naming the directory and the difference;
  * while the run works (`open`): the lock against a second process, `config.json` (the serialised
    config, which `--config=<run>/config.json` loads back, plus the stamp and provenance), the
    checkpointer, saved params, results files and figures;
  * interrupts: Ctrl-C and SIGTERM (what a cluster scheduler sends before preemption) both end the
    run the same way: the save in flight is finished, one line says how to resume, exit 130 / 143
    (a saved-params write holds the interrupt back until it is whole, `runs.tree_save`, so none is in
    flight at exit). An interrupt that arrives inside a gc callback is sent again a moment later.

The stamp is derived from the config (`settings.stamp`: the fields that can change a result) plus
the run's kind and its data's fingerprint; it is written in config.json and every checkpoint.

A distributed run's processes other than 0 (`writes=False`) check nothing and write nothing; they
open the same checkpoints, wait at the same barriers, restore the same step and take part in the same
saved-params writes (process 0 writes the arrays).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
from typing import Any, Iterator, Sequence

from dropnet_jax import settings
from dropnet_jax.runs import reporting
from dropnet_jax.runs.checkpoint import CheckpointError, Checkpointer, newest_meta, old_format_error
from dropnet_jax.runs.lock import RunLock, RunLockedError
from dropnet_jax.runs.saved_params import ParamsStore

CONFIG_FILE = 'config.json'


class Terminated(KeyboardInterrupt):
  """SIGTERM, raised in the main thread like Ctrl-C so both take the same way out (saves finish)."""


def _version() -> str:
  from dropnet_jax import __version__
  return __version__


def git_commit(package_dir: str | None = None) -> str | None:
  """The commit of the checkout the package runs from (`git rev-parse HEAD`), with `-dirty` when
  tracked files differ from it (untracked ones do not count, as with `git describe --dirty`); None
  when the package is not the top of a git checkout (an installed wheel, even inside another
  repository), or git is absent or fails. Never raises, never prints."""
  import subprocess
  package_dir = package_dir or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # dropnet_jax/

  def git(*args: str) -> str | None:
    try:
      # --no-optional-locks: a read only (status would otherwise refresh the index, taking its lock
      # from under a commit being made in the same checkout).
      proc = subprocess.run(['git', '--no-optional-locks', '-C', package_dir, *args], capture_output=True,
                            text=True, timeout=10, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):  # no git, or it hung
      return None
    return proc.stdout.strip() if proc.returncode == 0 else None

  found = git('rev-parse', '--show-toplevel', 'HEAD')
  if found is None or len(found.splitlines()) != 2:
    return None
  top, commit = found.splitlines()
  if os.path.realpath(top) != os.path.realpath(os.path.dirname(package_dir)):
    return None  # the package lies in some other repository (e.g. a virtualenv inside a checkout)
  changes = git('status', '--porcelain', '--untracked-files=no')
  return commit + ('-dirty' if changes else '') if changes is not None else commit


def provenance() -> dict[str, Any]:
  """What made a run, for config.json: the package version and git commit, the JAX and Flax versions,
  Python, and the devices (the first one's kind and platform, and how many)."""
  import platform
  import flax
  import jax
  devices = jax.devices()
  return {'dropnet_jax': _version(), 'git_commit': git_commit(), 'jax': jax.__version__,
          'flax': flax.__version__, 'python': platform.python_version(),
          'device_kind': devices[0].device_kind, 'platform': devices[0].platform, 'device_count': len(devices)}


class RunDir:
  """`path` as the output directory of a run of `kind` with `config` (see the module docstring)."""

  def __init__(self, path: str, kind: str, config: Any, *, inputs: Sequence[str] = (),
               data_fingerprint: str | None = None, writes: bool = True, distributed: bool = False):
    self.path, self.kind, self.config = path, kind, config
    self.inputs = [p for p in inputs if p]
    self.data_fingerprint = data_fingerprint
    self.writes, self.distributed = writes, distributed
    self._checkpointer: Checkpointer | None = None

  # -- what the run is ------------------------------------------------------------------------

  @property
  def stamp(self) -> dict[str, Any]:
    """What the run's results depend on: its kind, the result-changing settings, the data."""
    out = {'kind': self.kind, **settings.stamp(self.config)}
    if self.data_fingerprint is not None:
      out['data_fingerprint'] = self.data_fingerprint
    return out

  def file(self, *parts: str) -> str:
    return os.path.join(self.path, *parts)

  # -- checks, before any work -----------------------------------------------------------------

  def check(self) -> None:
    """Raises ValueError (one line) when the run may not use `path`; writes nothing."""
    if not self.writes:
      return
    out = self.path
    if not out:
      raise ValueError('--out is empty; give an output directory')
    if os.path.exists(out) and not os.path.isdir(out):
      raise ValueError(f'--out={out} is a file, not a directory')
    parent = os.path.abspath(out)
    while not os.path.exists(parent):
      parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
      raise ValueError(f'--out={out}: {parent} is a file, not a directory')
    if not os.access(parent, os.W_OK | os.X_OK):
      raise ValueError(f'--out={out}: {parent} is not writable')
    for source in self.inputs:
      if os.path.exists(source) and os.path.realpath(source) == os.path.realpath(out):
        raise ValueError(f'--out={out} is the directory of this run\'s input; write the {self.kind} outputs '
                         'elsewhere (a subdirectory is fine)')
    saved = self._saved_config()
    if saved is not None:
      if saved.get('kind') != self.kind:
        raise ValueError(f'--out={out} holds a {saved.get("kind") or "different"} run; use another --out '
                         f'for this {self.kind} run')
      differences = self._differences(saved.get('stamp'))
      if differences:
        raise ValueError(f'{out} holds a run with a different configuration ({"; ".join(differences)}); '
                         'use another --out or the same settings to resume')
    elif os.path.exists(self.file('results.jsonl')):
      raise ValueError(f'{out} has results.jsonl but no {CONFIG_FILE}; refusing to mix runs')
    old = old_format_error(self.file('checkpoints'))
    if old:
      raise ValueError(old)
    meta = newest_meta(self.file('checkpoints'))
    differences = self._differences((meta or {}).get('stamp'))
    if differences:
      raise ValueError(f'{out}/checkpoints were made with other settings or data ({"; ".join(differences)}); '
                       'use another --out or the same settings to resume')

  def _saved_config(self) -> dict[str, Any] | None:
    path = self.file(CONFIG_FILE)
    if not os.path.exists(path):
      return None
    saved = settings.read_run_config(path)
    return saved

  def _differences(self, saved: dict[str, Any] | None) -> list[str]:
    current = self.stamp
    if saved is not None and 'data_fingerprint' not in current:  # data not loaded yet: compared later
      saved = {k: v for k, v in saved.items() if k != 'data_fingerprint'}
    return settings.differences(saved, current)

  # -- while the run works ---------------------------------------------------------------------

  @contextlib.contextmanager
  def open(self, max_checkpoints: int | None = None, resume_hint: str = 'rerun the same command to resume'
           ) -> Iterator['RunDir']:
    """Holds the directory for this run: checks again under the lock, writes config.json, opens the
    checkpoints (`max_checkpoints`; None or 0: none; saved at most every `config.output.checkpoint_interval_s`
    seconds, see `runs.checkpoint`). Errors, Ctrl-C and SIGTERM end the program with one line after the
    save in flight, and the interrupted run's newest position, have been saved."""
    code = 0
    try:
      with _sigterm_as_interrupt():
        if not self.writes:
          yield from self._open_follower(max_checkpoints)
          return
        os.makedirs(self.path, exist_ok=True)
        with RunLock(self.path):
          self.check()  # again, now that no other run can change it
          reporting.atomic_write_text(self.file(CONFIG_FILE), json.dumps(self.config_json(), indent=2))
          if self.distributed:  # the others wait here; then all open the checkpoints (orbax's barriers)
            from dropnet_jax.training import distributed
            if max_checkpoints:  # made here, so no other process creates anything under --out
              os.makedirs(self.file('checkpoints'), exist_ok=True)
            distributed.barrier('open_run')
          if max_checkpoints:
            self._checkpointer = (_SyncedCheckpointer if self.distributed else Checkpointer)(
                self.file('checkpoints'), max_checkpoints, self._checkpoint_interval_s())
          try:
            yield self
          finally:
            if self._checkpointer is not None:
              self._checkpointer.close()  # waits for the save in flight: the newest checkpoint is whole
    except Terminated:
      print(f'terminated (SIGTERM); {resume_hint}', file=sys.stderr)
      code = 143
    except KeyboardInterrupt:
      print(f'interrupted; {resume_hint}', file=sys.stderr)
      code = 130
    except (RunLockedError, CheckpointError) as e:
      sys.exit(f'error: {e}')
    if code:
      sys.exit(code)

  def _open_follower(self, max_checkpoints: int | None):
    from dropnet_jax.training import distributed
    distributed.barrier('open_run')  # process 0 has made the directories and holds the lock
    if max_checkpoints:
      self._checkpointer = _SyncedCheckpointer(self.file('checkpoints'), max_checkpoints,
                                               self._checkpoint_interval_s())
    try:
      yield self
    finally:
      if self._checkpointer is not None:
        self._checkpointer.close()

  def _checkpoint_interval_s(self) -> float:
    """The config's `output.checkpoint_interval_s` (0, a checkpoint after every cycle, for configs without it)."""
    return float(getattr(getattr(self.config, 'output', None), 'checkpoint_interval_s', 0.0))

  def config_json(self) -> dict[str, Any]:
    """config.json: the config (loads back with --config), its stamp, and where it was made."""
    return {'kind': self.kind, 'config': settings.to_dict(self.config), 'stamp': self.stamp,
            'provenance': provenance()}

  @property
  def checkpointer(self) -> Checkpointer | None:
    return self._checkpointer

  def params_store(self, mode: str, spec: dict[str, Any]):
    """Where the trained θ of finished cycles go (<out>/params). --distributed: every process takes part in
    each save (orbax's barriers), process 0 alone writes (as for the checkpoints)."""
    return ParamsStore(self.file('params'), mode, spec, every_process=self.distributed, writes=self.writes)

  def write_results(self, records: list[dict[str, Any]], name: str = 'results') -> None:
    """All records so far as <name>.jsonl and <name>.csv (each written atomically)."""
    if not self.writes:
      return
    reporting.write_jsonl(self.file(f'{name}.jsonl'), records)
    reporting.write_csv(self.file(f'{name}.csv'), records)

  def write_text(self, name: str, text: str) -> str:
    path = self.file(name)
    if self.writes:
      reporting.atomic_write_text(path, text)
    return path

  def io(self, **changes):
    """The run-I/O object the loop takes (`loop.driver.RunIO`): checkpoints, results writer, stamp."""
    from dropnet_jax.loop.driver import RunIO
    return RunIO(checkpointer=self._checkpointer, on_record=self.write_results, stamp=self.stamp, **changes)


REDELIVER_S = 0.05  # how soon a signal that arrived where raising is lost is sent again


def _raising_is_lost(frame) -> bool:
  """Whether an exception raised in `frame` would be swallowed: inside a gc callback (JAX's
  `_xla_gc_callback`) or a `__del__`, CPython prints "Exception ignored" and the program carries on."""
  import gc
  callbacks = {getattr(c, '__code__', None) for c in gc.callbacks}
  while frame is not None:
    if frame.f_code in callbacks or frame.f_code.co_name == '__del__':
      return True
    frame = frame.f_back
  return False


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
  """SIGTERM raises `Terminated` and Ctrl-C KeyboardInterrupt in the main thread while the run works (the
  handlers are restored after). A signal that arrives inside a gc callback or a finalizer, where the
  exception would be printed and dropped, is sent again `REDELIVER_S` later, to land somewhere it counts."""
  if threading.current_thread() is not threading.main_thread():
    yield
    return

  def handler(signum, frame):
    if _raising_is_lost(frame):
      threading.Timer(REDELIVER_S, os.kill, (os.getpid(), signum)).start()
      return
    raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()

  # Ctrl-C only where Python's default handler has it (not where it is ignored, e.g. a job started with nohup).
  ctrl_c = signal.getsignal(signal.SIGINT) is signal.default_int_handler
  signums = [signal.SIGTERM] + ([signal.SIGINT] if ctrl_c else [])
  previous = {s: signal.signal(s, handler) for s in signums}
  try:
    yield
  finally:
    for s, old in previous.items():
      signal.signal(s, old if old is not None else signal.SIG_DFL)


class _SyncedCheckpointer(Checkpointer):
  """--distributed: every process restores the same step (no process moves on, and so no process 0
  saves a newer one, until all have read it); every process takes part in orbax's saves (its barriers,
  the interval decided on process 0), and the replicated arrays are written by process 0."""

  def restore_latest(self, make_template):
    from dropnet_jax.training import distributed
    found = super().restore_latest(make_template)
    distributed.barrier('restored')
    return found
