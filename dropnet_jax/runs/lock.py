"""An exclusive lock on an output directory, so two runs never write into one.

Two runs into one --out would interleave checkpoints and results (one of them
dies inside orbax). `RunLock` takes `flock(LOCK_EX | LOCK_NB)` on `<out>/.lock`
and writes the holder's pid and command line into it; a second run is refused
at once with a one-line RunLockedError naming that holder.

Why flock: the kernel releases it when the holding process dies however it
dies (SIGKILL, OOM kill, a crash), so a lock left by a killed run never blocks
the next one, and no stale-pid heuristics are needed. The lock file itself is
never deleted (deleting it would let a third process lock a fresh inode while a
second still holds the old one); releasing just empties it. The descriptor is
not inherited by exec'd children. Locks taken through NFS are emulated by the
kernel with POSIX locks and work across clients; a fork()ed child without exec
shares the lock until it exits.
"""

from __future__ import annotations

import fcntl
import os
import sys
import time

LOCK_NAME = '.lock'


class RunLockedError(ValueError):
  """The output directory is locked by another run."""


def _holder_line() -> str:
  command = ' '.join([os.path.basename(sys.executable)] + sys.argv)
  return f'{os.getpid()} {" ".join(command.split())}\n'  # one line: argv may contain newlines


class RunLock:
  """`with RunLock(out):` holds `<out>/.lock` exclusively for the block.

  `create`: make `out` (and parents) if missing; otherwise a missing `out` is a
  FileNotFoundError, so that a caller can validate its arguments before
  creating anything.
  """

  def __init__(self, out_dir: str, create: bool = False):
    self.out_dir = out_dir
    self.path = os.path.join(out_dir, LOCK_NAME)
    self.create = create
    self._fd: int | None = None

  @property
  def held(self) -> bool:
    return self._fd is not None

  def acquire(self) -> RunLock:
    if self._fd is not None:
      raise RuntimeError(f'{self.path} is already held by this RunLock')
    if self.create:
      os.makedirs(self.out_dir, exist_ok=True)
    elif not os.path.isdir(self.out_dir):
      raise FileNotFoundError(f'{self.out_dir}: no such directory')
    # No O_TRUNC: the file may hold the current holder's pid, which we report if refused.
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      os.close(fd)
      raise RunLockedError(f'{self.out_dir} is in use by another run ({self._describe_holder()}); '
                           'wait for it to finish or use another output directory') from None
    except BaseException:
      os.close(fd)
      raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, _holder_line().encode(), 0)
    self._fd = fd
    return self

  def _describe_holder(self) -> str:
    # The holder writes its line right after locking: retry briefly if we read in between.
    text = ''
    for _ in range(20):
      try:
        with open(self.path, errors='replace') as f:
          text = f.read().strip()
      except OSError:
        text = ''
      if text:
        break
      time.sleep(0.01)
    pid, _, command = text.partition(' ')
    if not pid.isdigit():
      return 'holder unknown'
    return f'pid {pid}: {command}' if command else f'pid {pid}'

  def release(self) -> None:
    if self._fd is None:
      return
    fd, self._fd = self._fd, None
    try:
      os.ftruncate(fd, 0)  # before unlocking, so that no new holder's line is erased
    finally:
      os.close(fd)  # closing the last descriptor drops the flock

  def __enter__(self) -> RunLock:
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()
