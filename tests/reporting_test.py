"""Tests for dropnet_jax.runs.reporting: I/O, statistics, table and figures."""

import math
import os

import numpy as np
import pytest

from dropnet_jax.runs import reporting

PNG_MAGIC = b'\x89PNG\r\n\x1a\n'
# Student-t 97.5% quantile with 2 degrees of freedom, from the df=2 closed form
# t_p = (2p - 1) / sqrt(2 p (1 - p)) (independent of scipy). Printed tables give
# 4.302652729911275, which is off by ~4e-11 relative.
T_975_DF2 = 0.95 / math.sqrt(2 * 0.975 * 0.025)


def _record(seed, metric, cycle, frac, test_acc, **extra):
  rec = {
      'seed': seed, 'metric': metric, 'cycle': cycle, 'fraction_remaining': frac,
      'units': [int(100 * frac), int(50 * frac)],
      'train_accuracy': min(1.0, test_acc + 0.02), 'val_accuracy': test_acc + 0.01,
      'test_accuracy': test_acc, 'train_loss': 0.1, 'val_loss': 0.2, 'test_loss': 0.25,
      'early_stop_epoch': 10 + cycle + seed, 'epochs_trained': 30 + cycle,
      'seconds': 1.5,
  }
  rec.update(extra)
  return rec


@pytest.fixture
def records():
  """Two seeds; 'min' has 3 cycles, 'random' only 2 (different lengths)."""
  fracs = [1.0, 0.8, 0.64]
  out = []
  for seed, offset in ((0, 0.0), (1, 0.02)):
    for c, f in enumerate(fracs):
      out.append(_record(seed, 'min', c, f, 0.90 + offset - 0.01 * c))
    for c, f in enumerate(fracs[:2]):
      out.append(_record(seed, 'random', c, f, 0.80 + offset - 0.05 * c))
  return out


# --- I/O -------------------------------------------------------------------


def test_jsonl_round_trip(tmp_path, records):
  records[0]['last_test_accuracy'] = np.float32(0.5)  # numpy scalars must encode
  records[1]['units'] = np.array([3, 4])
  records[2]['val_loss'] = float('nan')  # diverged runs
  path = tmp_path / 'sub' / 'results.jsonl'
  reporting.write_jsonl(path, records)
  back = reporting.read_jsonl(path)
  assert len(back) == len(records)
  assert back[0]['last_test_accuracy'] == pytest.approx(0.5)
  assert back[1]['units'] == [3, 4]
  assert math.isnan(back[2]['val_loss'])
  for a, b in zip(records[3:], back[3:]):
    assert a == b
  assert len(path.read_text().splitlines()) == len(records)


def test_read_jsonl_corrupt_line_names_line(tmp_path):
  path = tmp_path / 'r.jsonl'
  path.write_text('{"a": 1}\n\n{"a": 2}\n{"a": 3, \n')
  with pytest.raises(ValueError, match=r'line 4') as info:
    reporting.read_jsonl(path)
  assert str(path) in str(info.value)


def test_read_jsonl_non_object_line(tmp_path):
  path = tmp_path / 'r.jsonl'
  path.write_text('{"a": 1}\n[1, 2]\n')
  with pytest.raises(ValueError, match=r'line 2'):
    reporting.read_jsonl(path)


def test_atomic_write_replaces(tmp_path):
  path = tmp_path / 'f.txt'
  reporting.atomic_write_text(path, 'old')
  reporting.atomic_write_text(path, 'new')
  assert path.read_text() == 'new'
  assert os.listdir(tmp_path) == ['f.txt']


def test_atomic_write_failure_keeps_old_file(tmp_path, monkeypatch):
  path = tmp_path / 'f.txt'
  path.write_text('old content')

  def boom(src, dst):
    raise OSError('simulated crash before rename')

  monkeypatch.setattr(reporting.os, 'replace', boom)
  with pytest.raises(OSError, match='simulated'):
    reporting.atomic_write_text(path, 'new content that must not appear')
  assert path.read_text() == 'old content'
  assert os.listdir(tmp_path) == ['f.txt']  # temp file cleaned up


def test_atomic_write_failure_during_write(tmp_path, monkeypatch):
  path = tmp_path / 'f.bin'
  path.write_bytes(b'old')

  def boom(fd):
    raise OSError('disk full')

  monkeypatch.setattr(reporting.os, 'fsync', boom)
  with pytest.raises(OSError, match='disk full'):
    reporting.atomic_write_bytes(path, b'x' * 10000)
  assert path.read_bytes() == b'old'
  assert os.listdir(tmp_path) == ['f.bin']


# --- statistics --------------------------------------------------------------


def test_mean_ci_hand_computed():
  mean, half = reporting.mean_ci([1.0, 2.0, 3.0])
  assert mean == pytest.approx(2.0)
  # sample std of [1, 2, 3] is 1, so half = t * 1 / sqrt(3).
  assert half == pytest.approx(T_975_DF2 * 0.5773502691896258, rel=1e-12)
  assert half == pytest.approx(4.302652729911275 * 0.5773502691896258, rel=1e-9)


def test_mean_ci_single_value_and_empty():
  assert reporting.mean_ci([0.7]) == (pytest.approx(0.7), 0.0)
  with pytest.raises(ValueError):
    reporting.mean_ci([])


def test_mean_ci_other_confidence_is_narrower():
  _, h95 = reporting.mean_ci([1.0, 2.0, 3.0])
  _, h90 = reporting.mean_ci([1.0, 2.0, 3.0], confidence=0.90)
  assert 0 < h90 < h95


def test_aggregate_groups_by_metric_and_cycle(records):
  agg = reporting.aggregate(records, 'test_accuracy')
  assert list(agg) == ['min', 'random']
  assert len(agg['min']) == 3 and len(agg['random']) == 2
  frac, mean, half, n = agg['min'][2]
  assert frac == pytest.approx(0.64)
  assert mean == pytest.approx(0.89)  # (0.88 + 0.90) / 2
  # two values 0.02 apart: std = 0.02/sqrt(2), half = t_{.975,1} * std / sqrt(2)
  t1 = 12.706204736174698
  assert half == pytest.approx(t1 * 0.01, rel=1e-9)
  assert n == 2
  frac, mean, _, n = agg['random'][1]
  assert (frac, n) == (pytest.approx(0.8), 2)
  assert mean == pytest.approx(0.76)


def test_aggregate_sorts_by_cycle_and_skips_missing_key(records):
  shuffled = list(reversed(records))
  shuffled[0]['last_test_accuracy'] = 0.5
  agg = reporting.aggregate(shuffled, 'test_accuracy')
  assert [r[0] for r in agg['min']] == pytest.approx([1.0, 0.8, 0.64])
  only = reporting.aggregate(shuffled, 'last_test_accuracy')
  assert list(only) == [shuffled[0]['metric']]
  assert only[shuffled[0]['metric']][0][3] == 1


def test_summary_table(records):
  table = reporting.summary_table(records)
  assert 'min' in table and 'random' in table
  lines = table.splitlines()
  # title, header, rule, 3 cycles
  assert len(lines) == 6
  m_mean, m_half = reporting.mean_ci([0.90, 0.92])
  cell = f'{100 * m_mean:.2f}±{100 * m_half:.2f} (1.000)'
  assert cell == '91.00±12.71 (1.000)'
  assert cell in lines[3]
  assert '89.00±12.71 (0.640)' in lines[5]
  assert '76.00±12.71 (0.800)' in lines[4]
  # 'random' has no cycle 2: a placeholder, not a shifted value.
  assert lines[5].rstrip().endswith('-')
  assert 'n=2' in lines[1]


def test_summary_table_non_accuracy_key(records):
  table = reporting.summary_table(records, key='test_loss')
  assert '0.2500±0.0000 (1.000)' in table


# --- figures -----------------------------------------------------------------


def test_save_figures_writes_pngs(tmp_path, records):
  records.append(_record(0, 'my_new_metric', 0, 1.0, 0.5))
  paths = reporting.save_figures(records, tmp_path / 'figs', title='MNIST MLP')
  names = sorted(os.path.basename(p) for p in paths)
  assert names == ['accuracy_panels.png', 'early_stopping.png', 'test_accuracy.png']
  for p in paths:
    data = open(p, 'rb').read()
    assert len(data) > 1000
    assert data.startswith(PNG_MAGIC)
  assert sorted(os.listdir(tmp_path / 'figs')) == names  # no temp files left


def test_figure_axis_log_and_inverted(records):
  fig = reporting.make_figure(records, reporting.ACCURACY_KEYS)
  assert len(fig.axes) == 3
  for ax in fig.axes:
    assert ax.get_xscale() == 'log'
    assert ax.xaxis_inverted()
    left, right = ax.get_xlim()
    assert left > 1.0 and right < 0.64  # 1.0 on the left, sparser to the right
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ['min', 'random']
  # Shaded CI bands: one per metric.
  assert len(fig.axes[0].collections) == 2


def test_fixed_colours_are_stable():
  a = reporting.metric_styles(['random', 'min', 'zzz'])
  b = reporting.metric_styles(['min', 'apoz', 'oracle', 'random', 'aaa', 'zzz'])
  assert a['min']['color'] == b['min']['color'] == reporting.METRIC_STYLES['min']['color']
  assert a['random']['color'] == b['random']['color']
  known = {s['color'] for s in reporting.METRIC_STYLES.values()}
  assert b['aaa']['color'] not in known and b['zzz']['color'] not in known
  assert b['aaa']['color'] != b['zzz']['color']


def test_no_pyplot_side_effects(records):
  import sys
  had_pyplot = 'matplotlib.pyplot' in sys.modules
  reporting.make_figure(records, ('test_accuracy',))
  assert ('matplotlib.pyplot' in sys.modules) == had_pyplot


def test_accuracy_bands_stay_within_zero_and_one():
  # Three seeds, one far off: the t interval (half width ~1.6) would reach below 0 and above 1.
  recs = [{'seed': s, 'metric': 'max', 'cycle': 0, 'fraction_remaining': 0.5, 'test_accuracy': a,
           'test_loss': 4.0 * a} for s, a in enumerate((0.11, 0.11, 0.88))]
  fig = reporting.make_figure(recs, ('test_accuracy', 'test_loss'))
  acc_band = fig.axes[0].collections[0].get_paths()[0].vertices[:, 1]
  loss_band = fig.axes[1].collections[0].get_paths()[0].vertices[:, 1]
  assert acc_band.min() >= 0.0 and acc_band.max() <= 1.0
  assert loss_band.min() < 0.0  # losses are not clipped


def test_figures_can_use_the_compact_size_as_x_axis(tmp_path):
  records = [{'seed': 0, 'metric': 'min', 'cycle': c, 'fraction_remaining': f, 'params': p, 'macs': m,
              'test_accuracy': a, 'train_accuracy': a, 'val_accuracy': a, 'early_stop_epoch': 3}
             for c, (f, p, m, a) in enumerate([(1.0, 33450, 33360, 0.95), (0.8, 26000, 25900, 0.94),
                                              (0.5, 16000, 15950, 0.9)])]
  agg = reporting.aggregate(records, 'test_accuracy', x_key='params')
  assert [row[0] for row in agg['min']] == [33450, 26000, 16000]
  for axis in ('fraction', 'params', 'macs'):
    paths = reporting.save_figures(records, tmp_path / axis, x_axis=axis)
    assert all(os.path.getsize(p) > 1000 for p in paths)
  fig = reporting.make_figure(records, ('test_accuracy',), x_key='macs')
  assert 'multiply-accumulates' in fig.axes[0].get_xlabel()
  with pytest.raises(ValueError, match='x_axis'):
    reporting.save_figures(records, tmp_path / 'bad', x_axis='flops')
