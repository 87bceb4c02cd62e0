"""RunLock: one run per output directory; a killed holder does not block."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dropnet_jax.runs.lock import LOCK_NAME, RunLock, RunLockedError

REPO = Path(__file__).resolve().parents[1]


def test_second_holder_is_refused_in_one_line_naming_the_first(tmp_path):
  with RunLock(str(tmp_path)) as lock:
    assert lock.held
    holder = (tmp_path / LOCK_NAME).read_text()
    assert holder.split()[0] == str(os.getpid()) and holder.count('\n') == 1
    with pytest.raises(RunLockedError) as e:
      RunLock(str(tmp_path)).acquire()  # another open file description: flock conflicts in one process too
    message = str(e.value)
    assert f'pid {os.getpid()}' in message and '\n' not in message and str(tmp_path) in message
  assert not lock.held and (tmp_path / LOCK_NAME).read_text() == ''  # released and emptied
  with RunLock(str(tmp_path)):  # free again
    pass


def test_missing_directory_is_created_only_when_asked(tmp_path):
  out = tmp_path / 'a' / 'out'
  with pytest.raises(FileNotFoundError):
    RunLock(str(out)).acquire()
  assert not out.exists()
  with RunLock(str(out), create=True):
    assert (out / LOCK_NAME).is_file()


def test_lock_of_a_killed_process_does_not_block(tmp_path):
  holder = tmp_path / 'holder.py'
  holder.write_text(textwrap.dedent('''
      import sys, time
      from dropnet_jax.runs.lock import RunLock
      lock = RunLock(sys.argv[1]).acquire()
      print('locked', flush=True)
      time.sleep(3600)
  '''))
  out = tmp_path / 'out'
  out.mkdir()
  env = {**os.environ, 'PYTHONPATH': str(REPO)}
  proc = subprocess.Popen([sys.executable, str(holder), str(out), '--flag=x'], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, env=env)
  try:
    assert proc.stdout.readline() == 'locked\n', proc.stderr.read() if proc.poll() is not None else ''
    with pytest.raises(RunLockedError) as e:
      RunLock(str(out)).acquire()
    assert f'pid {proc.pid}' in str(e.value) and 'holder.py' in str(e.value) and '--flag=x' in str(e.value)
    proc.send_signal(signal.SIGKILL)  # no cleanup runs: the kernel drops the flock
    proc.wait(timeout=30)
  finally:
    proc.kill()
  assert (out / LOCK_NAME).read_text().split()[0] == str(proc.pid)  # the dead holder's line is still there
  with RunLock(str(out)):
    assert (out / LOCK_NAME).read_text().split()[0] == str(os.getpid())


def test_another_process_cannot_take_the_lock_while_it_is_held(tmp_path):
  code = ('import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR); '
          'fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB); print("ok")')
  with RunLock(str(tmp_path)):
    child = subprocess.run([sys.executable, '-c', code, str(tmp_path / LOCK_NAME)], capture_output=True, text=True)
  assert child.returncode != 0 and 'BlockingIOError' in child.stderr


def test_a_child_process_does_not_keep_the_lock(tmp_path):
  lock = RunLock(str(tmp_path)).acquire()
  # close_fds=False: only the descriptor's close-on-exec flag keeps it out of the child.
  child = subprocess.Popen([sys.executable, '-c', 'import time; print("up", flush=True); time.sleep(60)'],
                           close_fds=False, stdout=subprocess.PIPE, text=True)
  try:
    assert child.stdout.readline() == 'up\n'  # exec'd (the kernel closes cloexec fds just after vfork returns)
    lock.release()
    with RunLock(str(tmp_path)):  # refused if the child had inherited the locked descriptor
      pass
  finally:
    child.kill()
    child.wait()
