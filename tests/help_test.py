"""`--help` of every entry point: exit 0, the entry point's purpose (its module docstring) and its own
flags, no traceback; the same for the installed console commands (`dropnet_jax.cli.entry.run`).

absl's own `--help` exits 1 and, for a console command, lists none of the entry point's flags (it
files them under the main module, then the console script); these tests fail on either. Timing is
not asserted here (a shared machine makes it noise); the figures are measured by hand (a loop over
`python -m experiments.<name> --help` under /usr/bin/time).
"""

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
MODULES = sorted(p.stem for p in (REPO / 'experiments').glob('*.py') if p.stem != '__init__')
# A settings flag each entry point owns (one that says what the entry point is about). A new entry
# point fails `test_every_entry_point_has_a_flag_to_look_for` until it is added here.
OWN_FLAG = {
    'apoz_study': 'metrics', 'augment_samples': 'draws', 'benchmark': 'trials', 'compact': 'best_under_params',
    'compact_bench': 'batch_sizes',
    'compare': 'torch_threads', 'dropnet': 'metrics', 'ensemble': 'max_members', 'ensemble_bench': 'members',
    'fraction_study': 'fractions', 'lanes_bench': 'schedules', 'magnitude': 'sparsities',
    'magnitude_bench': 'amount', 'oracle_study': 'metrics',
    'protocol_study': 'metrics', 'randominit_study': 'seeds', 'schedules': 'schedules', 'smoke_train': 'models',
    'tune': 'n_trials', 'resnet_bn_bench': 'examples',
    'structured': 'prune_rates',
    'evaluate': 'networks', 'recipe_cost': 'recipes',
}
# Two console commands (pyproject.toml [project.scripts]) and the modules whose run()/cli() they call.
CONSOLE = {'dropnet-run': 'dropnet', 'dropnet-schedules': 'schedules'}


def first_doc_line(module: str) -> str:
  """The first line of the module's docstring, read from the source (importing it would define its flags)."""
  tree = ast.parse((REPO / 'experiments' / f'{module}.py').read_text())
  return ast.get_docstring(tree).splitlines()[0].strip()


def lists_flag(text: str, name: str) -> bool:
  """Whether absl's rendering of a flag list has --name (or --[no]name) as an entry."""
  return re.search(rf'^  (-.,)?--(\[no\])?{re.escape(name)}:', text, re.M) is not None


def check_help(proc: subprocess.CompletedProcess, module: str) -> None:
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]
  assert proc.stdout.startswith(first_doc_line(module)), proc.stdout[:300]
  assert lists_flag(proc.stdout, 'out'), proc.stdout
  assert lists_flag(proc.stdout, OWN_FLAG[module]), proc.stdout


def test_every_entry_point_has_a_flag_to_look_for():
  assert set(OWN_FLAG) == set(MODULES)


@pytest.mark.parametrize('module', MODULES)
def test_help_shows_the_purpose_and_the_flags(module):
  proc = subprocess.run([sys.executable, '-m', f'experiments.{module}', '--help'], cwd=REPO, env=ENV,
                        capture_output=True, text=True, timeout=120)
  check_help(proc, module)


@pytest.mark.parametrize('command', sorted(CONSOLE))
def test_console_command_help(command, tmp_path):
  path = Path(sys.executable).parent / command
  if not path.exists():
    pytest.skip(f'{command} is not installed in this environment (pip install -e .)')
  proc = subprocess.run([str(path), '--help'], cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=120)
  check_help(proc, CONSOLE[command])


def test_short_forms_and_the_full_list():
  run = lambda *args: subprocess.run([sys.executable, '-m', 'experiments.schedules', *args], cwd=REPO, env=ENV,
                                     capture_output=True, text=True, timeout=120)
  short, full = run('--lr=0.1', '-h'), run('--helpfull')
  check_help(short, 'schedules')
  assert not lists_flag(short.stdout, 'verbosity')  # absl's logging flags only in --helpfull
  check_help(full, 'schedules')
  assert lists_flag(full.stdout, 'verbosity')


def test_a_bad_flag_beside_help_is_still_reported():
  proc = subprocess.run([sys.executable, '-m', 'experiments.schedules', '--lrr=0.1', '--help'], cwd=REPO, env=ENV,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 1 and proc.stdout == ''
  assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]  # one line
  assert proc.stderr.startswith('error: ') and "Unknown command line flag 'lrr'" in proc.stderr
