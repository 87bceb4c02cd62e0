"""A run's records read back (`dropnet_jax.load_results` / `read_records`, dropnet_jax/runs/results.py)."""

import math

import pandas as pd
import pytest

import dropnet_jax as dj
from dropnet_jax.runs import reporting, results

RECORDS = [
    {'seed': 0, 'metric': 'min', 'cycle': 0, 'units': [4, 4], 'test_accuracy': 0.75, 'stop_reason': None},
    {'seed': 0, 'metric': 'min', 'cycle': 1, 'units': [3, 3], 'test_accuracy': 0.5, 'stop_reason': 'floor',
     'diverged': True},  # a field the first record lacks
    {'seed': 1, 'metric': 'max', 'cycle': 0, 'units': [4, 4], 'test_accuracy': float('nan'), 'stop_reason': None},
]


@pytest.fixture
def run_dir(tmp_path):
  reporting.write_jsonl(tmp_path / 'results.jsonl', RECORDS)
  return tmp_path


def test_read_records_gives_the_dicts_as_written(run_dir):
  got = results.read_records(run_dir)
  assert len(got) == len(RECORDS) and math.isnan(got[2].pop('test_accuracy'))
  expected = [dict(r) for r in RECORDS]
  expected[2].pop('test_accuracy')
  assert got == expected


def test_load_results_is_a_dataframe_one_row_per_record(run_dir):
  frame = results.load_results(str(run_dir))
  assert isinstance(frame, pd.DataFrame)
  assert list(frame.columns) == ['seed', 'metric', 'cycle', 'units', 'test_accuracy', 'stop_reason', 'diverged']
  assert frame['metric'].tolist() == ['min', 'min', 'max'] and frame['cycle'].tolist() == [0, 1, 0]
  assert frame['units'].tolist() == [[4, 4], [3, 3], [4, 4]]  # list fields stay lists
  assert pd.isna(frame.loc[0, 'diverged']) and frame.loc[1, 'diverged']  # absent in a record: missing
  assert frame.groupby('metric')['test_accuracy'].max().to_dict()['min'] == 0.75


def test_the_public_names_and_their_errors(tmp_path):
  assert dj.load_results is results.load_results and dj.read_records is results.read_records
  with pytest.raises(ValueError, match='no such directory'):
    dj.load_results(tmp_path / 'nowhere')
  with pytest.raises(ValueError, match='no results.jsonl'):
    dj.read_records(tmp_path)
  reporting.write_jsonl(tmp_path / 'results.jsonl', [])
  assert dj.read_records(tmp_path) == [] and len(dj.load_results(tmp_path)) == 0
