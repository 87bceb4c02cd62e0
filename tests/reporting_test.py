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
  mean, half = reporting.mean_ci([0.7])
  assert mean == pytest.approx(0.7) and math.isnan(half)  # no spread estimate, not a zero one
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
  frac, mean, low, high, n, kind = agg['min'][2]
  assert frac == pytest.approx(0.64)
  assert mean == pytest.approx(0.89)  # (0.88 + 0.90) / 2
  # two seeds: the band is their min-max (a t interval would be +-0.127, wider than the data)
  assert (low, high, kind) == (pytest.approx(0.88), pytest.approx(0.90), 'range')
  assert n == 2
  frac, mean, _, _, n, _ = agg['random'][1]
  assert (frac, n) == (pytest.approx(0.8), 2)
  assert mean == pytest.approx(0.76)


def test_aggregate_sorts_by_cycle_and_skips_missing_key(records):
  shuffled = list(reversed(records))
  shuffled[0]['last_test_accuracy'] = 0.5
  agg = reporting.aggregate(shuffled, 'test_accuracy')
  assert [r[0] for r in agg['min']] == pytest.approx([1.0, 0.8, 0.64])
  only = reporting.aggregate(shuffled, 'last_test_accuracy')
  assert list(only) == [shuffled[0]['metric']]
  assert only[shuffled[0]['metric']][0].n == 1


def test_summary_table(records):
  table = reporting.summary_table(records)
  assert 'min' in table and 'random' in table
  lines = table.splitlines()
  # title, header, rule, 3 cycles
  assert len(lines) == 6
  assert 'min–max of the seeds' in lines[0]  # two seeds: the brackets are the seeds' min and max
  assert '91.00 [90.00, 92.00] (1.000)' in lines[3]
  assert '89.00 [88.00, 90.00] (0.640)' in lines[5]
  assert '76.00 [75.00, 77.00] (0.800)' in lines[4]
  # 'random' has no cycle 2: a placeholder, not a shifted value.
  assert lines[5].rstrip().endswith('-')
  assert 'n=2' in lines[1]


def test_summary_table_non_accuracy_key(records):
  table = reporting.summary_table(records, key='test_loss')
  assert '0.2500 [0.2500, 0.2500] (1.000)' in table


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
  # One legend, beside the last panel.
  assert [t.get_text() for t in fig.axes[-1].get_legend().get_texts()] == ['min', 'random']
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


def _band(ax, i=0):
  """The y values of the i-th shaded band of `ax`."""
  return ax.collections[i].get_paths()[0].vertices[:, 1]


def test_few_seeds_band_is_the_seeds_min_max():
  # Three seeds, one far off: a t interval (half width ~1.6) would leave [0, 1]; the band is the data's range.
  recs = [{'seed': s, 'metric': 'max', 'cycle': 0, 'fraction_remaining': 0.5, 'test_accuracy': a,
           'delta': a - 0.5} for s, a in enumerate((0.11, 0.11, 0.88))]
  fig = reporting.make_figure(recs, ('test_accuracy', 'delta'))
  assert (_band(fig.axes[0]).min(), _band(fig.axes[0]).max()) == (pytest.approx(0.11), pytest.approx(0.88))
  assert (_band(fig.axes[1]).min(), _band(fig.axes[1]).max()) == (pytest.approx(-0.39), pytest.approx(0.38))
  title = fig.axes[-1].get_legend().get_title().get_text()
  assert 'n=3 seeds' in title and 'min–max' in title


def test_two_seed_band_stays_within_the_data(records):
  fig = reporting.make_figure(records, ('test_accuracy',))
  values = {m: [r['test_accuracy'] for r in records if r['metric'] == m] for m in ('min', 'random')}
  for i, metric in enumerate(('min', 'random')):
    band = _band(fig.axes[0], i)
    assert min(values[metric]) - 1e-12 <= band.min() and band.max() <= max(values[metric]) + 1e-12


def test_many_seeds_band_is_a_t_interval_clipped_to_the_valid_range():
  values = (0.05, 0.05, 0.05, 0.05, 0.05, 0.95)  # six seeds: mean - half < 0
  recs = [{'seed': s, 'metric': 'min', 'cycle': 0, 'fraction_remaining': 1.0, 'test_accuracy': a,
           'test_loss': a - 0.5, 'delta': a - 0.5} for s, a in enumerate(values)]
  mean, half = reporting.mean_ci(values)
  assert mean - half < 0
  fig = reporting.make_figure(recs, ('test_accuracy', 'test_loss', 'delta'))
  acc, loss, delta = (_band(ax) for ax in fig.axes)
  assert (acc.min(), acc.max()) == (0.0, pytest.approx(mean + half))  # accuracy: clipped to [0, 1]
  assert loss.min() == 0.0  # a loss is never negative
  assert delta.min() == pytest.approx(mean - half - 0.5)  # unbounded values keep the interval
  title = ' '.join(fig.axes[-1].get_legend().get_title().get_text().split())  # wrapped: one line
  assert 'n=6 seeds' in title and '95% t-interval' in title and "clipped to each value's range" in title
  table = reporting.summary_table(recs)
  assert 'clipped to [0, 100]' in table.splitlines()[0]
  assert f'{100 * mean:.2f} [0.00, {100 * (mean + half):.2f}]' in table


def test_one_seed_prints_and_draws_no_spread():
  recs = [{'seed': 0, 'metric': 'min', 'cycle': c, 'fraction_remaining': f, 'test_accuracy': a, 'test_loss': 0.3}
          for c, (f, a) in enumerate([(1.0, 0.9), (0.5, 0.8)])]
  table = reporting.summary_table(recs)
  assert '90.00 [n/a] (1.000)' in table and '80.00 [n/a] (0.500)' in table
  assert '±' not in table and '0.00,' not in table  # no zero spread that reads as a result
  assert 'n/a at n=1' in table.splitlines()[0]
  assert '0.3000 [n/a]' in reporting.summary_table(recs, 'test_loss')
  fig = reporting.make_figure(recs, ('test_accuracy',))
  assert not fig.axes[0].collections  # no band
  assert fig.axes[0].get_legend().get_title().get_text() == 'one seed (n=1): no band'


def test_labels_carry_n_when_metrics_have_different_seed_counts(records):
  records = [r for r in records if not (r['metric'] == 'random' and r['seed'] == 1)]
  fig = reporting.make_figure(records, ('test_accuracy',))
  texts = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
  assert texts == ['min (n=2)', 'random (n=1)']
  assert 'n/a at n=1' in ' '.join(fig.axes[0].get_legend().get_title().get_text().split())


def test_legend_is_beside_the_data(records):
  fig = reporting.make_figure(records, reporting.ACCURACY_KEYS, title='a title')
  fig.canvas.draw()
  legend = fig.axes[-1].get_legend().get_window_extent()
  for ax in fig.axes:
    assert not legend.overlaps(ax.get_window_extent())
  assert legend.x0 > fig.axes[-1].get_window_extent().x1


def test_variants_of_a_metric_share_its_colour():
  labels = ['min (paper)', 'max (paper)', 'min (official)', 'max (official)', 'min_layer (paper)',
            'min_layer (official)']
  styles = reporting.metric_styles(labels)
  assert list(styles) == ['min (paper)', 'min (official)', 'max (paper)', 'max (official)', 'min_layer (paper)',
                          'min_layer (official)']  # grouped by metric, each in order of appearance
  for base in ('min', 'max', 'min_layer'):
    paper, official = styles[f'{base} (paper)'], styles[f'{base} (official)']
    assert paper['color'] == official['color'] == reporting.METRIC_STYLES[base]['color']
    assert paper['marker'] == official['marker']
    assert (paper['linestyle'], paper['markerfacecolor']) != (official['linestyle'], official['markerfacecolor'])
  fractions = reporting.metric_styles(['min p=0.2', 'min p=0.5', 'min p=0.9'])
  assert len({s['color'] for s in fractions.values()}) == 1
  assert len({str(s['linestyle']) for s in fractions.values()}) == 3
  both = reporting.metric_styles(['min', 'min_randominit', 'my_metric', 'my_metric p=0.5'])
  assert both['min']['color'] == both['min_randominit']['color'] == 'tab:blue'
  assert both['min']['linestyle'] == '-' and both['min_randominit']['linestyle'] != '-'
  assert both['my_metric']['color'] == both['my_metric p=0.5']['color'] not in {
      s['color'] for s in reporting.METRIC_STYLES.values()}


def test_split_label():
  assert reporting.split_label('min (paper)') == ('min', '(paper)')
  assert reporting.split_label('min_layer_official') == ('min_layer', 'official')
  assert reporting.split_label('max_layer (official)') == ('max_layer', '(official)')
  assert reporting.split_label('min p=0.2') == ('min', 'p=0.2')
  assert reporting.split_label('random_layer') == ('random_layer', '')
  assert reporting.split_label('minimum') == ('minimum', '')  # 'min' only before '_' or the end
  assert reporting.split_label('DropNet min_layer') == ('min_layer', 'DropNet')  # the magnitude figure's
  assert reporting.split_label('oneshot') == ('oneshot', '')


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
