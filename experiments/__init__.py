"""absl-flag entry points over dropnet_jax (run as `python -m experiments.<name>`).

`--host_devices=N` (CPU only) splits the host into N XLA devices. XLA reads
that setting once, when jax is first imported, so this package applies it
before any entry point imports jax; the flag itself is declared here so every
entry point accepts it. Batched trials (`--batch_trials`, the benchmark) are
then split over the devices, one core's worth of trials each.
"""

import os
import sys

from absl import flags


def _host_devices_from_argv(argv) -> int | None:
  for i, arg in enumerate(argv):
    if arg.startswith('--host_devices='):
      value = arg.split('=', 1)[1]
    elif arg == '--host_devices' and i + 1 < len(argv):
      value = argv[i + 1]
    else:
      continue
    try:
      return int(value)
    except ValueError:
      sys.exit(f'error: --host_devices must be a positive integer, got {value!r}')
  return None


_HOST_DEVICES = _host_devices_from_argv(sys.argv)
if _HOST_DEVICES is not None:
  if _HOST_DEVICES < 1:
    sys.exit(f'error: --host_devices must be a positive integer, got {_HOST_DEVICES}')
  if 'jax' in sys.modules:
    sys.exit('error: --host_devices must be applied before jax is imported')
  if _HOST_DEVICES > 1:
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                               f' --xla_force_host_platform_device_count={_HOST_DEVICES}')

flags.DEFINE_integer('host_devices', 1, 'CPU only: split the host into this many XLA devices '
                     '(--xla_force_host_platform_device_count, applied before jax is imported); batched '
                     'trials are split over them.')
