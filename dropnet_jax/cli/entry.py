"""What every entry point shares besides its settings: `--out`, `--host_devices`, `--distributed`
(with its address flags), quiet library logging, and one-line errors.

An entry point is `CONFIG = entry.define(<its config default>, kind)`, a `main` that turns
`entry.config(CONFIG)` into one library call and prints a report, and `entry.run(main)`.
"""

from __future__ import annotations

import sys
from typing import Any, Callable, NoReturn

from absl import app, flags, logging

from dropnet_jax.cli import config_flags

FLAGS = flags.FLAGS
# Flags defined by the functions below belong to the entry point that calls them (its --help).
flags.disclaim_key_flags()


def define(default: Any, kind: str, *, out_help: str = 'Output directory (the run directory).',
           distributed: bool = False, out_required: bool = True) -> config_flags.ConfigFlags:
  """The entry point's flags: its settings (`config_flags.define`), --out (optional where
  `out_required` is False: the entry point then has a default or writes nothing), --host_devices, and
  with `distributed` the multi-process flags."""
  holder = config_flags.define(default, kind)
  flags.DEFINE_string('out', None, out_help, required=out_required)
  flags.DEFINE_integer('host_devices', 1, 'CPU only: split the host into this many XLA devices '
                       '(--xla_force_host_platform_device_count, applied before jax is imported); batched '
                       'trials are split over them.')
  if distributed:
    flags.DEFINE_bool('distributed', False, 'Several processes (hosts) train the run data-parallel over all '
                      'their devices (jax.distributed; on CPU with gloo collectives). Every process runs the '
                      'same command; only process 0 writes. Without the next three flags they come from the '
                      'cluster (SLURM, Open MPI).')
    flags.DEFINE_string('coordinator_address', None, '--distributed: host:port of process 0\'s coordinator.')
    flags.DEFINE_integer('num_processes', None, '--distributed: number of processes.')
    flags.DEFINE_integer('process_id', None, '--distributed: this process\'s index, 0..num_processes-1.')
    app.call_after_init(_initialize_distributed)
  app.call_after_init(_quiet_logging)
  return holder


def config(holder: config_flags.ConfigFlags, validate: bool = True) -> Any:
  """The parsed configuration; a bad value ends the program with one line naming it."""
  try:
    value = holder.value()
    if validate and hasattr(value, 'validate'):
      value.validate()
    return value
  except ValueError as e:
    fail(e)


def distributed() -> bool:
  return 'distributed' in FLAGS and FLAGS.distributed


def fail(error: Any) -> NoReturn:
  """Ends the program: one line, exit 1 (nothing has been written when this is called before work)."""
  sys.exit(f'error: {error}')


def require_torch_twin(what: str) -> None:
  """Raises ValueError (one line) unless torch and the PyTorch twin (tests/torch_reference, in a
  source checkout: test-only, not installed) import; for the tools that compare against PyTorch."""
  try:
    import torch  # noqa: F401
    import tests.torch_reference.train  # noqa: F401
  except ImportError as e:
    raise ValueError(f'{what} needs PyTorch ({e}): pip install torch==2.13.0, and a source checkout for '
                     'tests/torch_reference') from None


def run(main: Callable[[list[str]], Any]) -> None:
  app.run(main)


def _quiet_logging() -> None:
  """Library logging at WARNING and above (orbax logs every save at INFO, jax its backend search),
  unless --verbosity/-v was given. The run's own lines go through `runs.progress.ProgressMonitor`."""
  if not FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)


def _initialize_distributed() -> None:
  """--distributed: joins the processes of the run, after flag parsing and before main (and so before
  any jax computation, which would fix the backends to this process alone)."""
  from dropnet_jax.training import distributed as dist
  if not FLAGS.distributed:
    if FLAGS.coordinator_address or FLAGS.num_processes is not None or FLAGS.process_id is not None:
      fail('--coordinator_address, --num_processes and --process_id need --distributed')
    return
  try:
    dist.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  except (ValueError, RuntimeError) as e:
    fail(f'--distributed: {e}')
  logging.info('distributed: %s', dist.cluster_summary())
