"""The README is tested as written: its Python blocks run, and every `python -m experiments.<x>`
command in it parses (every flag exists and takes its value) and every recipe it names exists."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = (REPO / 'README.md').read_text()
BLOCKS = re.findall(r'```(\w+)\n(.*?)```', README, re.S)


def commands() -> list[list[str]]:
  """Each `python -m experiments.<x> ...` of the README's bash blocks, as argv after the module."""
  out = []
  for lang, body in BLOCKS:
    if lang != 'bash':
      continue
    text = body.replace('\\\n', ' ')
    for segment in re.split(r'\n|&&|;|\||(?<![<>])&(?!&)', text):
      match = re.search(r'python -m (experiments\.\w+)(.*)', segment)
      if match:
        args = [a.replace('$i', '0') for a in shlex.split(match.group(2), comments=True)]
        out.append([match.group(1), *args])
  return out


def test_the_readme_names_commands_of_every_kind():
  modules = {c[0] for c in commands()}
  assert {'experiments.dropnet', 'experiments.magnitude', 'experiments.compact', 'experiments.ensemble',
          'experiments.tune', 'experiments.protocol_study'} <= modules, modules


@pytest.mark.parametrize('argv', commands(), ids=lambda argv: ' '.join(argv)[:80])
def test_every_readme_command_parses(argv):
  module, *args = argv
  for arg in args:
    if arg.startswith('--config=') and arg.endswith('.py'):
      assert (REPO / arg.split('=', 1)[1]).is_file(), arg
  proc = subprocess.run([sys.executable, '-m', module, *args, '--helpshort'], cwd=REPO, capture_output=True,
                        text=True, timeout=300, env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert 'Flags parsing error' not in proc.stderr and 'Unknown command line flag' not in proc.stderr, proc.stderr
  assert 'Traceback' not in proc.stderr, proc.stderr[-2000:]
  assert '--out' in proc.stdout + proc.stderr  # the help was printed: everything before it parsed


def test_the_library_block_runs_as_written(tmp_path):
  blocks = [body for lang, body in BLOCKS if lang == 'python']
  assert blocks
  for body in blocks:
    proc = subprocess.run([sys.executable, '-c', body], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**os.environ, 'PYTHONPATH': str(REPO), 'JAX_PLATFORMS': 'cpu'})
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_the_two_process_example_exits_non_zero_when_a_process_fails(tmp_path):
  """The README's --distributed example, with a flag that makes every process fail at once: the block's
  exit status must say so (a bare `wait` reports 0)."""
  block = next(body for lang, body in BLOCKS if lang == 'bash' and '--process_id=$i' in body)
  broken = block.replace('--out=runs/dist', f'--out={tmp_path}/dist --no_such_flag')
  assert broken != block
  proc = subprocess.run(['bash', '-c', broken], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0, proc.stderr[-2000:]
  assert proc.stderr.count('no_such_flag') >= 2  # both processes ran and failed


def recipe_rows() -> list[list[str]]:
  """The cells of the README's table of the source documents' recipes."""
  section = README.split('### Recipes of the source documents', 1)[1].split('\n## ', 1)[0]
  rows = [line.strip('|').split('|') for line in section.splitlines() if line.startswith('| `')]
  return [[cell.strip() for cell in row] for row in rows]


def test_the_recipe_table_is_true():
  """Every row: the recipe exists, its docstring runs it with the entry point the row names, a reduced
  test runs it, and the GPU time is what experiments.recipe_cost estimates for it."""
  from dropnet_jax.cli.config_flags import recipe_config
  from dropnet_jax.runs import recipe_cost
  rows = recipe_rows()
  assert len(rows) >= 14
  reduced = (REPO / 'tests' / 'recipes_test.py').read_text()
  for recipe, _, _, command, hours in rows:
    name = recipe.strip('`')
    path = REPO / 'configs' / name
    assert path.is_file(), name
    assert f'python -m {command.strip("`")} --config=configs/{name}' in path.read_text(), name
    assert f"'{name}'" in reduced, f'{name}: no reduced run in tests/recipes_test.py'
    try:
      expected = recipe_cost.format_hours(recipe_cost.estimate(recipe_config(str(path))).gpu_seconds)
    except recipe_cost.TrainsNothing:
      expected = 'trains nothing'
    assert hours.split(' (')[0] == expected, (name, hours, expected)
