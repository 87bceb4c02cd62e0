"""Which running trials still have a live worker: heartbeats, claims, and the failing of dead ones.

Apart from the worker loop (`study`) because it is the one concern that spans processes and machines.
A worker *claims* each trial the moment Optuna creates it (`claim`, called from the sampler's
`before_trial`, before any parameter is sampled or anything trained): its first heartbeat and the
worker's name, machine and PID as user attributes. A trial whose worker died is then failed and retried
(the storage's stale-trial callback) by any other worker:
  * at once on the same machine when its PID no longer exists (`fail_dead_local_trials`);
  * after the heartbeat's grace period anywhere (`optuna.storages.fail_stale_trials`);
  * after the grace period as seen by this process when it was never claimed (`UnclaimedTrials`): a
    worker killed between Optuna's creation of the trial and its claim (a few milliseconds) leaves a
    running trial with no heartbeat, which Optuna's stale check never fails (it skips trials without
    one), so the study would never reach `n_trials` on a rerun (issue 23).
"""

from __future__ import annotations

import os
import random
import socket
import threading
import time

import optuna
from optuna.trial import TrialState

CLAIM_ATTRS = ('worker', 'worker_machine', 'worker_pid', 'worker_trial_id')


def _retry(fn, attempts: int = 8):
  """A storage call, retried on lock contention (SQLite answers concurrent writers with errors)."""
  for i in range(attempts):
    try:
      return fn()
    except optuna.exceptions.StorageInternalError:
      if i == attempts - 1:
        raise
      time.sleep(0.1 * 2 ** i * (1 + random.random()))


class Heartbeat:
  """Records heartbeats for this worker's running trials from a thread (Optuna's own heartbeat runs
  only inside `study.optimize`)."""

  def __init__(self, storage):
    self.storage = storage
    self.interval = storage.get_heartbeat_interval() if hasattr(storage, 'get_heartbeat_interval') else None
    self.ids: set[int] = set()
    self._lock, self._stop = threading.Lock(), threading.Event()
    self._thread = threading.Thread(target=self._loop, daemon=True) if self.interval else None

  def __enter__(self):
    if self._thread:
      self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()
    if self._thread:
      self._thread.join()

  def add(self, trial_id: int) -> None:
    if self.interval:
      _retry(lambda: self.storage.record_heartbeat(trial_id))
    with self._lock:
      self.ids.add(trial_id)

  def discard(self, trial_id: int) -> None:
    with self._lock:
      self.ids.discard(trial_id)

  def _loop(self) -> None:
    while not self._stop.wait(self.interval):
      with self._lock:
        ids = list(self.ids)
      for i in ids:
        try:
          self.storage.record_heartbeat(i)
        except Exception:  # a failed beat is retried next interval; a stale trial is retried by others
          pass


def worker_name(worker_id: int) -> str:
  return f'{socket.gethostname()}:{os.getpid()}:{worker_id}'


def machine_id() -> str:
  """This host and PID namespace (hostname, boot id, /proc/self/ns/pid): processes with the same id see
  each other's PIDs. '' where unknown (then no trial is judged by its PID)."""
  try:
    with open('/proc/sys/kernel/random/boot_id') as f:
      boot = f.read().strip()
    return f'{socket.gethostname()}|{boot}|{os.readlink("/proc/self/ns/pid")}'
  except OSError:
    return ''


def claim(storage, beat: Heartbeat, trial_id: int, worker_id: int) -> None:
  """This worker's first heartbeat for the trial, then its name, machine and PID on it, and the trial's id
(a retry inherits its failed trial's user attributes: those are not a claim of the retry)."""
  beat.add(trial_id)
  for key, value in zip(CLAIM_ATTRS, (worker_name(worker_id), machine_id(), os.getpid(), trial_id)):
    _retry(lambda: storage.set_trial_user_attr(trial_id, key, value))


def claimed(trial) -> bool:
  """Whether a worker has claimed this trial itself (an older worker's claim had no trial id)."""
  own = trial.user_attrs.get('worker_trial_id')
  return own == trial._trial_id if own is not None else 'worker_pid' in trial.user_attrs


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # exists, another user's
    return True
  return True


def _fail_and_retry(study, trials) -> list[int]:
  """Fails `trials` (running) and hands each to the storage's stale-trial callback (the retry); the
  numbers of those this call failed (another worker may get there first)."""
  storage, failed = study._storage, []
  for t in trials:
    try:
      if storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL):
        failed.append(t)
    except optuna.exceptions.UpdateFinishedTrialError:  # another worker got there first
      continue
  get = getattr(storage, 'get_heartbeat_stale_trial_callback', None) or getattr(storage, 'get_failed_trial_callback',
                                                                                   lambda: None)
  callback = get()
  for t in failed:
    if callback is not None:
      callback(study, storage.get_trial(t._trial_id))
  return [t.number for t in failed]


def fail_dead_local_trials(study) -> list[int]:
  """Fails the running trials of worker processes on this machine that no longer exist (killed, crashed)
  without waiting for their heartbeat to go stale, and retries them. A reused PID only delays this to
  the heartbeat's grace period."""
  me = machine_id()
  if not me:
    return []
  dead = []
  for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
    pid = t.user_attrs.get('worker_pid')
    if claimed(t) and t.user_attrs.get('worker_machine') == me and pid != os.getpid() and not _alive(pid):
      dead.append(t)
  return _fail_and_retry(study, dead)


class UnclaimedTrials:
  """Fails (and retries) the running trials that stay unclaimed (no worker attributes) for `grace`
  seconds of this process's clock from when it first saw them: a live worker claims its trial within
  milliseconds of its creation, before sampling. Local time, so no clocks are compared across machines."""

  def __init__(self, grace: float, clock=time.monotonic):
    self.grace, self.clock = grace, clock
    self.first_seen: dict[int, float] = {}

  def fail(self, study) -> list[int]:
    now, unclaimed = self.clock(), []
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for t in running:
      if not claimed(t) and now - self.first_seen.setdefault(t._trial_id, now) > self.grace:
        unclaimed.append(t)
    ids = {t._trial_id for t in running}
    self.first_seen = {i: s for i, s in self.first_seen.items() if i in ids}
    return _fail_and_retry(study, unclaimed)
