"""--distributed fails fast: the processes meet over a plain socket before JAX's runtime (which aborts
with a C++ stack, and only after its timeout, when they cannot), so every way of not meeting ends in
one line within --join_timeout."""

import socket
import subprocess
import sys
import threading
import time

import pytest

from dropnet_jax.training import distributed as dist

REPO = __import__('pathlib').Path(__file__).resolve().parents[1]


def _free_address() -> str:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return f'127.0.0.1:{s.getsockname()[1]}'


@pytest.mark.parametrize('address', ['127.0.0.1', ':1234', 'host:0', 'host:65536', 'host:12a', ''])
def test_malformed_addresses_are_refused(address):
  with pytest.raises(ValueError, match='--coordinator_address'):
    dist.parse_address(address)
  assert dist.parse_address('[::1]:80') == ('::1', 80)


def _meet(address, num_processes, ids, timeout=10.0):
  """Runs rendezvous for `ids` in threads; returns {id: None or the exception}."""
  results = {}

  def one(i, n):
    try:
      dist.rendezvous(address, n, i, timeout)
      results[i] = None
    except Exception as e:  # noqa: BLE001  (the test looks at it)
      results[i] = e
  threads = [threading.Thread(target=one, args=(i, n)) for i, n in ids]
  for t in threads:
    t.start()
    time.sleep(0.05)
  for t in threads:
    t.join(30)
  return results


def test_all_processes_meet():
  address = _free_address()
  assert _meet(address, 3, [(1, 3), (0, 3), (2, 3)]) == {0: None, 1: None, 2: None}
  with socket.socket() as s:  # the port is free again for JAX's coordinator
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(dist.parse_address(address))


def test_a_different_process_count_is_named():
  results = _meet(_free_address(), 2, [(0, 2), (1, 3)])
  assert all(isinstance(e, dist.JoinError) for e in results.values())
  assert 'num_processes=3' in str(results[1]) and 'num_processes=3' in str(results[0])


def test_a_missing_process_and_nothing_listening_time_out_in_one_line():
  started = time.monotonic()
  results = _meet(_free_address(), 3, [(0, 3), (1, 3)], timeout=1.5)
  assert 'only 2 of 3 processes joined' in str(results[0]) and '[2]' in str(results[0])
  assert isinstance(results[1], dist.JoinError)  # process 0 gave up: process 1 cannot join either
  lonely = _meet(_free_address(), 2, [(1, 2)], timeout=1.0)[1]
  assert 'could not join process 0' in str(lonely) and 'refused' in str(lonely)
  assert time.monotonic() - started < 10


def test_entry_point_exits_with_one_line():
  proc = subprocess.run([sys.executable, '-m', 'experiments.dropnet', '--distributed',
                         f'--coordinator_address={_free_address()}', '--num_processes=2', '--process_id=1',
                         '--join_timeout=1', '--out=/nonexistent/never_written'],
                        cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  assert len(lines) == 1 and 'could not join process 0' in lines[0] and 'Traceback' not in proc.stderr, proc.stderr
