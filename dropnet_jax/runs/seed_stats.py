"""The mean of a metric over seeds and the spread shown with it, in tables and figures.

A spread must be one a reader can take at face value. A Student-t interval over 2-4 seeds is
wider than the data (t = 12.7 at 2 seeds, 4.3 at 3) and leaves [0, 1] for accuracies, so tables
printed `49.53±94.14` and figure bands were clipped; and a `±0.00` at one seed reads as a result.
So: one seed, no spread ('none', shown as n/a); fewer than `CI_MIN_SEEDS` seeds, the min-max of the
seeds ('range', always inside the data); from there on the usual t-interval of the mean, clipped
to the value's range ('ci'). `band_phrase` words it for a legend or a table's title line.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
from scipy import stats

from dropnet_jax.runs.styles import metric_order

# Fewer seeds than this: the band is the seeds' min-max. A Student-t interval over 2-4 seeds is
# wider than the data (t = 12.7 at 2 seeds) and leaves [0, 1]; from 5 seeds on it is the usual
# 95% interval of the mean, clipped to the value's range.
CI_MIN_SEEDS = 5


class Point(NamedTuple):
  """One (metric, cycle) averaged over seeds: x (the fraction, or `x_key`), the mean and its band.

  `kind` says what [low, high] is: 'range' (min-max of the seeds, n < CI_MIN_SEEDS), 'ci' (the
  t-interval, clipped to `value_range`) or 'none' (one seed: low and high are nan)."""
  x: float
  mean: float
  low: float
  high: float
  n: int
  kind: str


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
  """Mean and Student-t confidence-interval half width over `values` (seeds).

  A single value has no spread estimate, so its half width is nan (shown as 'n/a').
  """
  x = np.asarray(values, dtype=np.float64).ravel()
  if x.size == 0:
    raise ValueError('mean_ci needs at least one value')
  if not 0.0 < confidence < 1.0:
    raise ValueError(f'confidence must be in (0, 1), got {confidence}')
  mean = float(x.mean())
  if x.size == 1:
    return mean, math.nan
  t = stats.t.ppf(0.5 + confidence / 2.0, df=x.size - 1)
  half = float(t * x.std(ddof=1) / math.sqrt(x.size))
  return mean, half


def value_range(key: str) -> tuple[float, float]:
  """The values `key` can take: [0, 1] for accuracies and similarities, [0, inf) for losses, epochs,
  times and counts, else unbounded; a confidence band is clipped to it."""
  if 'accuracy' in key or 'similarity' in key or key == 'fraction_remaining':
    return 0.0, 1.0
  if any(word in key for word in ('loss', 'epoch', 'seconds', 'params', 'macs')):
    return 0.0, math.inf
  return -math.inf, math.inf


def spread(values: Sequence[float], key: str = '', confidence: float = 0.95) -> tuple[float, float, float, str]:
  """(mean, low, high, kind) of one metric's values over seeds; see `Point` and `CI_MIN_SEEDS`."""
  mean, half = mean_ci(values, confidence)
  x = np.asarray(values, dtype=np.float64).ravel()
  if x.size == 1:
    return mean, math.nan, math.nan, 'none'
  if x.size < CI_MIN_SEEDS:
    return mean, float(x.min()), float(x.max()), 'range'
  lo, hi = value_range(key)
  return mean, max(mean - half, lo), min(mean + half, hi), 'ci'


def _clip_phrase(keys: Sequence[str], scale: float) -> str:
  ranges = {value_range(k) for k in keys}
  if len(ranges) > 1:
    return ", clipped to each value's range"
  lo, hi = ranges.pop() if ranges else (-math.inf, math.inf)
  if math.isfinite(lo) and math.isfinite(hi):
    return f', clipped to [{scale * lo:g}, {scale * hi:g}]'
  return f', clipped at {scale * lo:g}' if math.isfinite(lo) else ''


def band_phrase(kinds: Iterable[str], keys: str | Sequence[str] = (), confidence: float = 0.95,
                scale: float = 1.0) -> str:
  """What the bands (figures) or brackets (tables) of points of these kinds are, in words, for values
  of `keys` (one key or several, for the clip range) shown in units of `scale` (100: percent)."""
  kinds = set(kinds)
  clip = _clip_phrase([keys] if isinstance(keys, str) else list(keys), scale)
  mixed = len(kinds - {'none'}) > 1
  parts = []
  if 'range' in kinds:
    parts.append('min–max of the seeds' + (f' (n < {CI_MIN_SEEDS})' if mixed else ''))
  if 'ci' in kinds:
    parts.append(f'{100 * confidence:g}% t-interval of the mean{clip}' + (f' (n >= {CI_MIN_SEEDS})' if mixed else ''))
  if 'none' in kinds:
    parts.append('n/a at n=1')
  return '; '.join(parts)


def aggregate(records: Iterable[Mapping[str, Any]], key: str,
              confidence: float = 0.95, x_key: str = 'fraction_remaining') -> dict[str, list[Point]]:
  """Averages `key` over seeds per (metric, cycle).

  Returns:
    {metric: [Point(x, mean, low, high, n, kind), ...]} sorted by cycle, x being the mean of `x_key`
    (the fraction remaining, or the compact network's `params` / `macs`); metrics in
    `metric_order`. Records without `key` (or with None) are skipped, so optional fields such as
    `last_test_accuracy` aggregate too. The fraction is averaged although deterministic unit
    counts make it equal across seeds, so non-deterministic schedules still plot sensibly.
  """
  groups: dict[str, dict[int, tuple[list[float], list[float]]]] = {}
  for r in records:
    value = r.get(key)
    if value is None:
      continue
    cell = groups.setdefault(str(r['metric']), {}).setdefault(int(r['cycle']), ([], []))
    cell[0].append(float(r[x_key]))
    cell[1].append(float(value))
  out: dict[str, list[Point]] = {}
  for metric in metric_order(groups):
    out[metric] = []
    for cycle in sorted(groups[metric]):
      xs, values = groups[metric][cycle]
      mean, low, high, kind = spread(values, key, confidence)
      out[metric].append(Point(float(np.mean(xs)), mean, low, high, len(values), kind))
  return out
