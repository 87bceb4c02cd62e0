"""The evaluation's report (`runs.evaluate`): one table of every network (markdown for files and
pipes, rich on a terminal) and the JSON of every figure.

One column list (`COLUMNS`) drives both tables, so the terminal and the report file never show
different columns. Accuracies are printed in percent with two decimals; the reference column is the
record's (or the export's own check's) test accuracy, beside ours, and `reproduced` says whether
every split's count of correct predictions, every loss and the pruned-weight count agree
(`evaluate.differences`; the JSON lists what differs).
"""

from __future__ import annotations

import json
from typing import Any, Callable, Sequence


def _percent(key: str) -> Callable[[dict[str, Any]], str]:
  return lambda row: '-' if row.get(key) is None else f'{100 * row[key]:.2f}'


def _loss(key: str) -> Callable[[dict[str, Any]], str]:
  return lambda row: '-' if row.get(key) is None else f'{row[key]:.4f}'


def _count(key: str) -> Callable[[dict[str, Any]], str]:
  return lambda row: '-' if row.get(key) is None else f'{row[key]:,}'


def _reproduced(row: dict[str, Any]) -> str:
  return 'yes' if row['reproduced'] else 'NO'


# (header, cell of a row); the first column is the network.
COLUMNS: tuple[tuple[str, Callable[[dict[str, Any]], str]], ...] = (
    ('network', lambda row: row['network']),
    ('train acc %', _percent('train_accuracy')),
    ('train loss', _loss('train_loss')),
    ('val acc %', _percent('val_accuracy')),
    ('val loss', _loss('val_loss')),
    ('test acc %', _percent('test_accuracy')),
    ('test loss', _loss('test_loss')),
    ('reference test acc %', _percent('reference_test_accuracy')),
    ('reproduced', _reproduced),
    ('params', _count('params')),
    ('effective params', _count('effective_params')),
    ('non-zero params', _count('nonzero_params')),
    ('sparsity %', _percent('sparsity')),
    ('global sparsity %', _percent('global_sparsity')),
    ('MACs', _count('macs')),
)


def cells(rows: Sequence[dict[str, Any]]) -> list[list[str]]:
  return [[cell(row) for _, cell in COLUMNS] for row in rows]


def markdown(rows: Sequence[dict[str, Any]]) -> str:
  """The table in markdown (numbers right-aligned), then a line per network that does not reproduce."""
  def escape(text: str) -> str:
    return text.replace('|', '\\|')
  head = '| ' + ' | '.join(h for h, _ in COLUMNS) + ' |'
  rule = '| --- |' + ' ---: |' * (len(COLUMNS) - 1)
  body = ['| ' + ' | '.join(escape(c) for c in row) + ' |' for row in cells(rows)]
  return '\n'.join([head, rule, *body, *mismatch_lines(rows)])


def mismatch_lines(rows: Sequence[dict[str, Any]]) -> list[str]:
  return [f'\n{row["network"]} does not reproduce its reference: {"; ".join(row["differences"])}'
          for row in rows if not row['reproduced']]


NETWORK_MIN_WIDTH = 20


def print_rich(rows: Sequence[dict[str, Any]], console: Any = None) -> None:
  """The table drawn by rich on `console` (default: stdout at the terminal's width): a header word per
  line, numbers never cut, the network's name folded; a terminal too narrow for that gets the markdown."""
  from rich import box
  from rich.console import Console
  from rich.markup import escape
  from rich.table import Table
  console = console or Console()
  values = cells(rows)
  widths = [max([len(word) for word in header.split()] + [len(v[i]) for v in values])
            for i, (header, _) in enumerate(COLUMNS)]
  widths[0] = min(widths[0], NETWORK_MIN_WIDTH)
  if sum(w + 3 for w in widths) > console.width:  # a space each side and a separator
    console.print(markdown(rows), highlight=False, soft_wrap=True, markup=False)
    return
  table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
  for i, (header, _) in enumerate(COLUMNS):
    if i == 0:
      table.add_column(header, overflow='fold', min_width=widths[0])
    else:
      table.add_column(header.replace(' ', '\n'), justify='right', no_wrap=True, min_width=widths[i])
  for row, row_values in zip(rows, values):
    table.add_row(*(escape(v) for v in row_values), style=None if row['reproduced'] else 'red')
  console.print(table)
  for line in mismatch_lines(rows):
    console.print(line.strip(), style='red', highlight=False, markup=False)


def to_json(rows: Sequence[dict[str, Any]]) -> str:
  """{'columns': the table's headers, 'networks': every row with every figure}."""
  return json.dumps({'columns': [h for h, _ in COLUMNS], 'networks': list(rows)}, indent=1, default=float)
