"""The command line of every entry point: settings flags derived from the config fields
(`config_flags`), the process set-up every entry point shares (`entry`: --out, --host_devices,
--distributed, --help, quiet logging, one-line errors).

`--host_devices=N` (CPU only) splits the host into N XLA devices. XLA reads that setting once, when jax
is first imported, so it is applied here, on import of this package, which every entry point imports
before anything that imports jax (the top-level `dropnet_jax` package imports no jax).
"""

import os
import sys


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


HOST_DEVICES = _host_devices_from_argv(sys.argv)
if HOST_DEVICES is not None:
  if HOST_DEVICES < 1:
    sys.exit(f'error: --host_devices must be a positive integer, got {HOST_DEVICES}')
  if 'jax' in sys.modules:
    sys.exit('error: --host_devices must be applied before jax is imported')
  if HOST_DEVICES > 1:
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                               f' --xla_force_host_platform_device_count={HOST_DEVICES}')
