"""reporting.write_csv: every record and key survives, lists as JSON text, the write is atomic."""

from __future__ import annotations

import csv
import json
import math
import os

import numpy as np

from dropnet_jax.runs import reporting


def test_csv_holds_the_same_values_as_jsonl(tmp_path):
  records = [
      {'seed': 0, 'metric': 'min', 'cycle': 0, 'fraction_remaining': 1.0, 'units': [40, 40],
       'test_accuracy': 0.96937328577041626, 'mask': ['1111', '1011'], 'diverged': False, 'stop_reason': None},
      {'seed': np.int64(1), 'metric': 'max, "quoted"', 'cycle': 3, 'fraction_remaining': np.float32(0.525),
       'units': np.array([19, 23]), 'test_accuracy': float('nan'), 'val_loss': float('inf'), 'diverged': True,
       'stop_reason': 'floor'},
  ]
  path = tmp_path / 'results.csv'
  reporting.write_csv(path, records)
  with open(path, newline='') as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 2
  # Columns: every key, in order of first appearance (val_loss only in the second record).
  assert list(rows[0]) == ['seed', 'metric', 'cycle', 'fraction_remaining', 'units', 'test_accuracy', 'mask',
                           'diverged', 'stop_reason', 'val_loss']
  a, b = rows
  assert a['units'] == '[40, 40]' and json.loads(a['units']) == [40, 40]
  assert json.loads(a['mask']) == ['1111', '1011']
  assert float(a['test_accuracy']) == 0.96937328577041626  # full precision
  assert a['stop_reason'] == '' and a['val_loss'] == ''  # None and missing: empty cells
  assert a['diverged'] == 'False' and b['diverged'] == 'True'
  assert b['seed'] == '1' and b['metric'] == 'max, "quoted"'
  assert float(b['fraction_remaining']) == float(np.float32(0.525))
  assert json.loads(b['units']) == [19, 23]
  assert math.isnan(float(b['test_accuracy'])) and float(b['val_loss']) == math.inf


def test_csv_rewrite_replaces_the_file_and_leaves_no_temporaries(tmp_path):
  path = tmp_path / 'results.csv'
  reporting.write_csv(path, [{'a': 1}, {'a': 2}])
  reporting.write_csv(path, [{'a': 3}])
  assert path.read_text() == 'a\n3\n'
  assert os.listdir(tmp_path) == ['results.csv']
  reporting.write_csv(path, [])
  assert path.read_text() == ''  # no records: an empty file
