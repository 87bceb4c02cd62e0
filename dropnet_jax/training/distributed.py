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
"""

from __future__ import annotations

import os
import jax
import numpy as np


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, initialization_timeout: int = 120,
               heartbeat_timeout_seconds: int = 30) -> None:
  """Joins this process to the run: `jax.distributed.initialize` with CPU collectives enabled.

  Arguments that are None are taken from the environment (JAX_COORDINATOR_ADDRESS, or a
  cluster JAX detects: SLURM, Open MPI, Kubernetes, Cloud TPU). The timeouts bound how long a
  process waits for the others to start, and how soon the others stop after one dies.
  """
  if num_processes is not None and num_processes < 1:
    raise ValueError(f'--num_processes must be >= 1, got {num_processes}')
  if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
    raise ValueError(f'--process_id must be in [0, {num_processes}), got {process_id}')
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

