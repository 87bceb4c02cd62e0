"""What a person sees: console commands, one line per cycle when piped, a bar on a terminal, results.csv.

Runs the real entry point (the installed `dropnet-run` when the project was
installed with pip, else the same `run()` through python -c) on the bundled
digits data, so it needs no files beside the checkout.
"""

from __future__ import annotations

import ast
import csv
import json
import os
import pty
import re
import subprocess
import sys
import tomllib
from pathlib import Path

from dropnet_jax.runs import reporting
from dropnet_jax.runs.progress import expected_cycles

REPO = Path(__file__).resolve().parents[1]
TINY = ['--widths=8,8', '--fraction=0.5', '--floor=0.3', '--max_epochs=4', '--checkpoint_every_epochs=0']
ANSI = re.compile(r'\x1b\[[0-9;?]*[A-Za-z]')


def scripts() -> dict[str, str]:
  with open(REPO / 'pyproject.toml', 'rb') as f:
    return tomllib.load(f)['project']['scripts']


def dropnet_run() -> list[str]:
  installed = Path(sys.executable).parent / 'dropnet-run'
  if installed.exists():
    return [str(installed)]
  return [sys.executable, '-c', 'from experiments.dropnet import run; run()']


def test_every_console_command_is_a_zero_argument_run_of_an_entry_point():
  entries = scripts()
  assert {'dropnet-run', 'dropnet-oracle', 'dropnet-randominit', 'dropnet-fraction', 'dropnet-apoz',
          'dropnet-protocol', 'dropnet-compare', 'dropnet-benchmark'} <= set(entries)
  for command, target in entries.items():
    module, function = target.split(':')
    assert module.startswith('dropnet_jax.experiments.'), command  # no top-level `experiments` in the wheel
    path = REPO / (module.removeprefix('dropnet_jax.').replace('.', '/') + '.py')
    tree = ast.parse(path.read_text())
    defs = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    assert function in defs, f'{command}: {path} has no {function}()'
    fn = defs[function]
    assert not fn.args.args and not fn.args.posonlyargs and not fn.args.kwonlyargs, command
    calls = [n for n in ast.walk(fn) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
             and n.func.attr == 'run' and isinstance(n.func.value, ast.Name) and n.func.value.id in ('app', 'entry')]
    assert calls, f'{command}: {function}() does not call app.run (or entry.run)'
    # `python -m <module>` runs the same function.
    main_guard = [n for n in tree.body if isinstance(n, ast.If) and '__main__' in ast.unparse(n.test)]
    assert main_guard and f'{function}()' in ast.unparse(main_guard[0]), command


def test_piped_run_prints_one_line_per_cycle_and_writes_csv(tmp_path):
  out = tmp_path / 'run'
  proc = subprocess.run([*dropnet_run(), *TINY, '--metrics=min,max_layer', f'--out={out}'], cwd=REPO,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  records = reporting.read_jsonl(out / 'results.jsonl')
  lines = proc.stdout.splitlines()
  assert '\x1b' not in proc.stdout and '\r' not in proc.stdout  # no bar off a terminal
  # No library INFO chatter (absl's format: I<mmdd> <time> ...).
  assert not [l for l in proc.stderr.splitlines() if re.match(r'I\d{4} ', l)], proc.stderr[:2000]
  assert 'orbax' not in proc.stdout + proc.stderr
  # A header, one line per record (in order), the summary table, the wall time.
  assert lines[0].startswith('[0:00:') and 'Model A (FC8-FC8) on 8x8 digits: 2 trials' in lines[0]
  cycle_lines = lines[1:1 + len(records)]
  for line, r in zip(cycle_lines, records):
    assert re.match(rf'\[\d:\d\d:\d\d eta [-:\d]+\] seed 0 +{r["metric"]} cycle +{r["cycle"]} ', line), line
  table = reporting.summary_table(records, 'test_accuracy').splitlines()
  assert '\n'.join(lines[1 + len(records):-1]).strip('\n') == '\n'.join(table).strip('\n')
  assert lines[-1].startswith('wall time') and len(lines) <= len(records) + len(table) + 3
  # The floor stops each trial within the estimate the progress bar uses, one of them exactly on it.
  per_trial = [sum(r['metric'] == m for r in records) for m in ('min', 'max_layer')]
  assert max(per_trial) == expected_cycles([8, 8], 0.5, 0.3) and all(n > 1 for n in per_trial)
  # results.csv beside results.jsonl, the same records.
  with open(out / 'results.csv', newline='') as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == len(records)
  for row, r in zip(rows, records):
    assert (row['metric'], int(row['cycle'])) == (r['metric'], r['cycle'])
    assert float(row['test_accuracy']) == r['test_accuracy'] and json.loads(row['units']) == r['units']
    assert json.loads(row['mask']) == r['mask'] and row['stop_reason'] == (r['stop_reason'] or '')


def run_in_terminal(argv: list[str], cwd: Path) -> tuple[int, str]:
  """Runs argv with stdout and stderr on a pseudo-terminal; its exit status and everything it drew."""
  master, slave = pty.openpty()
  proc = subprocess.Popen(argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave)
  os.close(slave)
  chunks = []
  while True:
    try:
      data = os.read(master, 65536)
    except OSError:  # EIO: the child closed the terminal
      break
    if not data:
      break
    chunks.append(data)
  os.close(master)
  return proc.wait(timeout=600), b''.join(chunks).decode('utf-8', 'replace')


def test_on_a_terminal_a_bar_is_drawn_and_verbose_adds_epoch_lines(tmp_path):
  out = tmp_path / 'tty'
  code, drawn = run_in_terminal([*dropnet_run(), *TINY, '--metrics=min', '--verbose', f'--out={out}'], REPO)
  assert code == 0, drawn[-3000:]
  assert '\x1b[' in drawn  # drawn with terminal control codes
  text = ANSI.sub('', drawn)
  assert re.search(r'trial 1/1  seed 0 (dense|min)  cycle \d+  epoch \d+  val acc \d\.\d{4}', text)
  assert re.search(r'\d+% \d:\d\d:\d\d eta \d:\d\d:\d\d', text)
  records = reporting.read_jsonl(out / 'results.jsonl')
  assert len(re.findall(r'seed 0 +min cycle +\d+ fraction', text)) == len(records)  # the per-cycle lines
  epoch_lines = re.findall(r'cycle +\d+ epoch +\d+ train_loss \S+ val_loss \S+ val_acc', text)  # --verbose
  assert len(epoch_lines) >= sum(r['epochs_trained'] for r in records[1:])
  assert (out / 'results.csv').exists()
