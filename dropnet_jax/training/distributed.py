"""Several processes (hosts) training one run data-parallel: `jax.distributed` set-up and helpers.

Every process runs the same program on the same data: the same jitted steps in
lockstep over a mesh of all processes' devices (`global_devices()`), each step's
batch split over them, gradients all-reduced by XLA's collectives (on CPU: gloo
over TCP, JAX's default CPU collectives once `jax.distributed` is initialised).
Parameters and the dataset are replicated on every device, so any process can
read a result (`np.asarray` of a fully replicated array reads its local copy).
Only process 0 (`is_main()`) writes files; the others read process 0's
checkpoints (a shared filesystem, or the same machine) so that all resume from
the same state.

`initialize` must run before any other jax work (it configures the backends).
Coordinator address, process count and id come from the arguments when given,
otherwise from the cluster environment: SLURM's variables (srun), Open MPI's,
or JAX's other auto-detected clusters (`jax.distributed.initialize` with
unset arguments).

Failing fast. JAX's runtime aborts the process with a C++ stack when the
coordinator never answers or a process never joins, and only after its
timeout. With an explicit `--coordinator_address`, `rendezvous` first meets
the other processes over a plain TCP socket on the coordinator's port (process
0 listens, the others connect and say who they are), then closes it, and only
then hands the port to JAX. Nothing listening, a process that never comes, a
different process count or a repeated id each end in one line within
`join_timeout` seconds. A malformed address is refused before anything.
"""

from __future__ import annotations

import json
import os
import socket
import time

import jax
import numpy as np


class JoinError(RuntimeError):
  """The processes of a --distributed run could not meet (one line saying why)."""


def parse_address(address: str) -> tuple[str, int]:
  """(host, port) of a 'host:port' coordinator address; ValueError naming the flag when malformed."""
  host, sep, port = str(address).rpartition(':')
  host = host[1:-1] if host.startswith('[') and host.endswith(']') else host  # [ipv6]:port
  if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise ValueError(f'--coordinator_address={address!r}: expected host:port with a port in 1..65535')
  return host, int(port)


def _send(conn: socket.socket, message: dict) -> None:
  conn.sendall(json.dumps(message).encode() + b'\n')


def _receive(conn: socket.socket, deadline: float) -> dict:
  data = b''
  while not data.endswith(b'\n'):
    conn.settimeout(max(0.01, deadline - time.monotonic()))
    chunk = conn.recv(4096)
    if not chunk:
      raise ConnectionError('closed')
    data += chunk
  return json.loads(data)


def rendezvous(address: str, num_processes: int, process_id: int, join_timeout: float = 120.0) -> None:
  """Meets the other processes at `address` before JAX does (see the module docstring); raises
  JoinError with one line when they cannot meet within `join_timeout` seconds."""
  host, port = parse_address(address)
  deadline = time.monotonic() + join_timeout
  hello = {'process_id': process_id, 'num_processes': num_processes}
  if process_id == 0:
    with socket.socket(socket.AF_INET6 if ':' in host else socket.AF_INET) as server:
      server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
      try:
        server.bind((host, port))
      except OSError as e:
        raise JoinError(f'process 0 cannot listen on {address} ({e.strerror}): is the port in use?') from None
      server.listen(num_processes)
      peers: dict[int, socket.socket] = {}
      try:
        while len(peers) < num_processes - 1:
          server.settimeout(max(0.01, deadline - time.monotonic()))
          try:
            conn, _ = server.accept()
            message = _receive(conn, deadline)
          except (socket.timeout, TimeoutError):
            raise JoinError(f'only {len(peers) + 1} of {num_processes} processes joined {address} within '
                            f'{join_timeout:g} s (missing process ids: '
                            f'{sorted(set(range(1, num_processes)) - set(peers))})') from None
          except (ConnectionError, ValueError):
            continue  # not one of ours (a port scan, a dropped connection): keep waiting
          other, count = message.get('process_id'), message.get('num_processes')
          problem = None
          if count != num_processes:
            problem = f'process {other} was started with --num_processes={count}, process 0 with {num_processes}'
          elif other in peers or not isinstance(other, int) or not 0 < other < num_processes:
            problem = f'two processes use --process_id={other}' if other in peers else f'bad --process_id={other}'
          if problem:
            _send(conn, {'error': problem})
            conn.close()
            raise JoinError(problem)
          peers[other] = conn
        for conn in peers.values():
          _send(conn, {'go': True})
      finally:
        for conn in peers.values():
          conn.close()
    return
  last_error = 'nothing listens there'
  while True:
    if time.monotonic() >= deadline:
      raise JoinError(f'process {process_id} could not join process 0 at {address} within {join_timeout:g} s '
                      f'({last_error}); is process 0 running with the same --coordinator_address?')
    try:
      with socket.create_connection((host, port), timeout=max(0.01, deadline - time.monotonic())) as conn:
        _send(conn, hello)
        reply = _receive(conn, deadline)
      if 'error' in reply:
        raise JoinError(reply['error'])
      return
    except (OSError, ValueError) as e:  # refused, reset, timed out (all OSError), or not our reply
      last_error = getattr(e, 'strerror', None) or type(e).__name__
      time.sleep(0.2)


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, initialization_timeout: int = 120,
               heartbeat_timeout_seconds: int = 30, join_timeout: float | None = None) -> None:
  """Joins this process to the run: `jax.distributed.initialize` with CPU collectives enabled.

  Arguments that are None are taken from the environment (JAX_COORDINATOR_ADDRESS, or a
  cluster JAX detects: SLURM, Open MPI, Kubernetes, Cloud TPU). The timeouts bound how long a
  process waits for the others to start, and how soon the others stop after one dies.
  """
  if num_processes is not None and num_processes < 1:
    raise ValueError(f'--num_processes must be >= 1, got {num_processes}')
  if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
    raise ValueError(f'--process_id must be in [0, {num_processes}), got {process_id}')
  if coordinator_address is not None:
    parse_address(coordinator_address)
    if num_processes is None or process_id is None:
      raise ValueError('--coordinator_address needs --num_processes and --process_id')
    if num_processes > 1:
      rendezvous(coordinator_address, num_processes, process_id,
                 initialization_timeout if join_timeout is None else join_timeout)
  # gloo is JAX's default for multi-process CPU collectives; set explicitly so a user's
  # JAX_CPU_COLLECTIVES_IMPLEMENTATION=none does not leave cross-process steps without one.
  if jax.config.jax_cpu_collectives_implementation is None:
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                             process_id=process_id, initialization_timeout=initialization_timeout,
                             heartbeat_timeout_seconds=heartbeat_timeout_seconds)


def is_initialized() -> bool:
  return jax.distributed.is_initialized()


def is_main() -> bool:
  """True in process 0 (the one that writes files), and in a single-process run."""
  return jax.process_index() == 0


def global_devices() -> list[jax.Device]:
  """Every process's devices, in the global order (the mesh a multi-process Trainer spans)."""
  return list(jax.devices())


def replicate_host_array(array: np.ndarray, sharding: jax.sharding.Sharding) -> jax.Array:
  """A host array (the same in every process) as a global array on `sharding` (each process
  fills its own devices' shards; nothing crosses the network)."""
  array = np.asarray(array)
  return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def barrier(name: str) -> None:
  """Waits until every process reaches the barrier `name` (a no-op with one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def cluster_summary() -> str:
  """One line for the log: this process's place in the run."""
  return (f'process {jax.process_index()} of {jax.process_count()}, {len(jax.local_devices())} local of '
          f'{jax.device_count()} devices ({jax.devices()[0].platform}); SLURM_JOB_ID='
          f'{os.environ.get("SLURM_JOB_ID", "-")}')

