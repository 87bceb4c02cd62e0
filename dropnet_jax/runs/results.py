"""A run's records read back, for notebooks and analysis scripts (the public `dropnet_jax.load_results`).

Every run directory holds `results.jsonl`, one JSON object per record (for DropNet: one per seed x
metric x cycle), in the order the records were made; it is the source (`results.csv` beside it is a
copy for spreadsheets). `load_results` gives it as a pandas DataFrame, one row per record and one
column per field in order of first appearance, because that is what an analysis starts from (group by
metric, average over seeds, plot against `fraction_remaining`); `read_records` gives the plain list of
dicts, exactly as the run returned them, for code that wants no pandas. List fields (`units`, `mask`)
stay Python lists in their cells.

pandas is imported by `load_results` only, so reading records (and the training path) never pays for it.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from dropnet_jax.runs import reporting

if TYPE_CHECKING:
  import pandas

RESULTS_FILE = 'results.jsonl'


def read_records(run_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
  """The run's records (its results.jsonl) as dicts, in the order they were made: equal to what
  `dropnet_jax.run` returned. Raises ValueError (one line) when `run_dir` has no results.jsonl or a
  line of it is not JSON."""
  path = os.path.join(os.fspath(run_dir), RESULTS_FILE)
  if not os.path.isfile(path):
    what = 'no such directory' if not os.path.isdir(run_dir) else f'no {RESULTS_FILE} (no record finished yet?)'
    raise ValueError(f'{os.fspath(run_dir)}: {what}')
  return reporting.read_jsonl(path)


def load_results(run_dir: str | os.PathLike[str]) -> 'pandas.DataFrame':
  """The run's records as a pandas DataFrame: one row per record in the order they were made, one
  column per field (order of first appearance; a field a record lacks is NaN/None there)."""
  import pandas as pd
  records = read_records(run_dir)
  columns = list(dict.fromkeys(key for record in records for key in record))
  return pd.DataFrame.from_records(records, columns=columns)
