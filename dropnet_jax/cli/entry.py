"""What every entry point shares besides its settings: `--out`, `--host_devices`, `--distributed`
(with its address flags), its help, quiet library logging, and one-line errors.

An entry point is `CONFIG = entry.define(<its config default>, kind)`, a `main` that turns
`entry.config(CONFIG)` into one library call and prints a report, and `entry.run(main)`.

Help is handled here rather than by absl, whose `--help` exits 1 and, for an installed console
command, lists none of the entry point's flags (absl files them under the main module, which is then
the console script). `--help`, `-h`, `-?` and `--helpshort` print the entry point's module docstring
and the flags its module owns (run options, then settings; the long `--config.<path>` twin of a
setting with a short flag is named in brackets instead of listed twice) and exit 0; `--helpfull`
adds every other flag absl knows (logging). The rest of the command line is parsed first, so a
mistyped flag or a bad value before or after `--help` is still reported (the README test relies on
that), but a missing `--out` is not: help needs none.
"""

from __future__ import annotations

import errno
import inspect
import os
import sys
import warnings
from typing import Any, Callable, NoReturn

from absl import app, flags, logging

from dropnet_jax.cli import config_flags

FLAGS = flags.FLAGS
# Flags defined by the functions below belong to the entry point that calls them (its --help).
flags.disclaim_key_flags()

HELP_ARGS = ('--help', '-h', '-?', '--helpshort', '--helpfull')
# The settings flags of every `define` (help lists them apart from the run options), and the flags
# an entry point must be given.
_SETTINGS: list[config_flags.ConfigFlags] = []
_REQUIRED: list[str] = []


def define(default: Any, kind: str, *, out_help: str = 'Output directory (the run directory).',
           distributed: bool = False, out_required: bool = True) -> config_flags.ConfigFlags:
  """The entry point's flags: its settings (`config_flags.define`), --out (optional where
  `out_required` is False: the entry point then has a default or writes nothing), --host_devices, and
  with `distributed` the multi-process flags."""
  holder = config_flags.define(default, kind)
  _SETTINGS.append(holder)
  app.call_after_init(_quiet_logging)  # first: joining a --distributed run logs too
  flags.DEFINE_string('out', None, out_help, required=out_required)
  if out_required:
    _REQUIRED.append('out')
  flags.DEFINE_integer('host_devices', 1, 'CPU only: split the host into this many XLA devices '
                       '(--xla_force_host_platform_device_count, applied before jax is imported); batched '
                       'trials are split over them.')
  if distributed:
    flags.DEFINE_bool('distributed', False, 'Several processes (hosts) train the run data-parallel over all '
                      'their devices (jax.distributed; on CPU with gloo collectives). Every process runs the '
                      'same command; only process 0 writes and prints. Without the next three flags they come '
                      'from the cluster (SLURM, Open MPI).')
    flags.DEFINE_string('coordinator_address', None, '--distributed: host:port of process 0\'s coordinator.')
    flags.DEFINE_integer('num_processes', None, '--distributed: number of processes.')
    flags.DEFINE_integer('process_id', None, '--distributed: this process\'s index, 0..num_processes-1.')
    flags.DEFINE_float('join_timeout', 120.0, '--distributed: seconds the processes wait for each other at the '
                       'start before giving up with one line (nothing listening, a process that never comes).')
    app.call_after_init(_initialize_distributed)
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
  """Runs `main` under absl (flags parsed, logging set up); a help flag prints `help_text` instead
  and exits 0 (see the module docstring)."""
  argv = sys.argv
  asked = _help_asked(argv[1:])
  if asked is None:
    app.run(_checked_main(main))
    return
  rest = [a for a in argv[1:] if a not in HELP_ARGS]
  try:
    FLAGS([argv[0], *rest])
  except flags.Error as e:
    # Parsed but a validator failed (a required --out is missing): help needs none.
    if not FLAGS.is_parsed():
      fail(f'{e} (--help alone lists the flags)')
  print(help_text(main, full=asked == '--helpfull'))
  sys.exit(0)


DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)  # a full disk, a quota, a file system made read-only


def _checked_main(main: Callable[[list[str]], Any]) -> Callable[[list[str]], Any]:
  """absl hands `main` the words of the command line that are not flags. No entry point takes any, and
  one left unread is a setting the user meant but the run ignores (`--metrics=min max` runs min only):
  refused in one line before any work. Ctrl-C while preparing (reading or downloading data) ends in one
  line, exit 130, as it does during a run. Also the last resort for a disk that fills up (or turns read-only)
  while an entry point writes its outputs: one line naming the file, not a traceback (what was written
  before is whole: files are written atomically)."""
  def checked(argv: list[str]) -> Any:
    if len(argv) > 1:
      fail(f'unexpected arguments {argv[1:]}: settings are given as --flag=value')
    try:
      return main(argv)
    except KeyboardInterrupt:  # Ctrl-C before a run took over (runs.run_dir ends its own: saved, exit 130)
      print('interrupted (Ctrl-C)', file=sys.stderr)
      sys.exit(130)
    except OSError as e:
      if e.errno not in DISK_ERRNOS:
        raise
      fail(f'writing {e.filename or "the outputs"} failed: {e.strerror} (errno {e.errno}); free space and rerun '
           'the same command')
  return checked


def help_text(main: Callable[..., Any], full: bool = False) -> str:
  """The help of the entry point whose `main` this is: its module docstring, its run options and its
  settings (with `full`, also every flag absl knows)."""
  module_name = main.__module__
  doc = inspect.cleandoc(getattr(sys.modules.get(module_name), '__doc__', None) or '')
  # absl files a flag under the module that defined it, the main module under the script's path.
  owner = sys.argv[0] if module_name == '__main__' else module_name
  own = {f.name: f for f in FLAGS.flags_by_module_dict().get(owner, [])}
  settings = set().union(*(h.flag_names() for h in _SETTINGS))
  long_twins = set().union(*(h.long_twins() for h in _SETTINGS))
  required = [f'--{name}' for name in _REQUIRED if name in own]
  run_title = 'Run options' + (f' ({", ".join(required)} required)' if required else '')
  parts = [doc, _render(run_title, [f for n, f in own.items() if n not in settings])]
  shown = [f for n, f in own.items() if n in settings and n not in long_twins]
  if shown:
    parts.append(_render('Settings', shown, note='--config=<recipe.py or config.json> sets them all, the flags '
                         'below override it; [config.<path>] is the long form of a short flag.'))
  if full:
    app.define_help_flags()
    others = sorted(name for name in FLAGS.flags_by_module_dict() if name != owner)
    parts.append('\nThe other flags, by the module that defines them:\n\n' +
                 '\n\n'.join(FLAGS.module_help(name).strip('\n') for name in others))
  else:
    parts.append('\n--helpfull lists every flag, absl\'s logging flags (--verbosity, ...) too.')
  return '\n'.join(p for p in parts if p)


def _help_asked(args: list[str]) -> str | None:
  """The first help flag among the arguments (before a `--`), or None."""
  for arg in args:
    if arg == '--':
      return None
    if arg in HELP_ARGS:
      return arg
  return None


def _render(title: str, flag_list: list[flags.Flag], note: str = '') -> str:
  """absl's rendering of `flag_list` (sorted by name, wrapped, with defaults) under `title`, with
  `note` below the title."""
  if not flag_list:
    return ''
  section = flags.FlagValues()
  for flag in flag_list:
    flags.DEFINE_flag(flag, flag_values=section, module_name=title)
  text = section.module_help(title)
  if note:
    head, body = text.split(':\n', 1)
    text = f'{head}:\n{flags.text_wrap(note, indent="  ")}\n{body}'
  return text


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
    if FLAGS.join_timeout <= 0:
      fail(f'--join_timeout must be > 0, got {FLAGS.join_timeout}')
    dist.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                    join_timeout=FLAGS.join_timeout)
  except (ValueError, RuntimeError) as e:
    fail(f'--distributed: {e}')
  logging.info('distributed: %s', dist.cluster_summary())
  if not dist.is_main():
    # Process 0 alone prints (`runs.experiment.run`); the others show errors only (stderr), not even
    # the warnings process 0 shows too. Their stdout goes to /dev/null at the descriptor, past
    # Python: native libraries print there too (gloo: '[Gloo] Rank 1 is connected to 1 peer ranks').
    if not FLAGS['verbosity'].present:
      logging.set_verbosity(logging.ERROR)
    warnings.simplefilter('ignore')
    sys.stdout.flush()
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.close(devnull)
