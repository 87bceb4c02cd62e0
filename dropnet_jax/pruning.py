"""Unit scores and mask updates: pure functions of (stats, mask, PRNG key).

A *mask* is a tuple with one float32 vector per masked layer (1 kept, 0
dropped). *Stat sums* are what a pass over the data accumulates per unit (see
`StatSums`); `unit_scores` turns them into one score per unit and
`update_mask` drops a fraction of the remaining units by a metric.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dropnet_jax.models import Masks


class StatSums(NamedTuple):
  """Per-unit sums of post-activation statistics over a set of examples."""
  abs_sum: tuple[jax.Array, ...]  # sum over examples of mean |a|, per layer (units,)
  zero_sum: tuple[jax.Array, ...]  # sum over examples of the fraction of zeros
  count: jax.Array  # number of examples summed (scalar)


class MetricSpec(NamedTuple):
  score: str  # 'abs' (mean |activation|), 'apoz' (fraction of zeros) or 'random'
  drop: str  # which end is dropped: 'lowest' or 'highest'
  layerwise: bool  # the same fraction inside each layer instead of globally


METRICS: dict[str, MetricSpec] = {
    'min': MetricSpec('abs', 'lowest', False),
    'max': MetricSpec('abs', 'highest', False),
    'random': MetricSpec('random', 'lowest', False),
    'min_layer': MetricSpec('abs', 'lowest', True),
    'max_layer': MetricSpec('abs', 'highest', True),
    'random_layer': MetricSpec('random', 'lowest', True),
    # APoZ (Hu et al. 2016): drop the units that are zero most often.
    'apoz': MetricSpec('apoz', 'highest', False),
    'apoz_layer': MetricSpec('apoz', 'highest', True),
}


def check_metric(metric: str) -> MetricSpec:
  if metric not in METRICS:
    raise ValueError(f'unknown metric {metric!r}; choose from {sorted(METRICS)}')
  return METRICS[metric]


def unit_scores(sums: StatSums, metric: str) -> tuple[jax.Array, ...]:
  """Per-unit scores for `metric`: mean |a| over all examples, or APoZ.

  Random metrics ignore scores; they get the mean |a| so the result is always
  a well-defined array of the right shape.
  """
  spec = check_metric(metric)
  source = sums.zero_sum if spec.score == 'apoz' else sums.abs_sum
  return tuple(s / sums.count for s in source)


def num_to_drop(fraction, remaining):
  """floor(fraction * remaining) for the decimal fraction, computed in float32.

  Products that are exact integers in decimal (0.7 * 90 = 63) can come out
  just below in binary floating point (62.99999999999999, so Python's int()
  gives 62); the relative nudge gives the decimal answer for every fraction
  with a few decimal digits (tested on a grid against exact rationals).
  """
  remaining = jnp.asarray(remaining, jnp.float32)
  return jnp.floor(jnp.asarray(fraction, jnp.float32) * remaining * (1 + 1e-6)).astype(jnp.int32)


def _drop_ranked(mask: jax.Array, priority: jax.Array, n_drop: jax.Array, key: jax.Array) -> jax.Array:
  """Drops the `n_drop` kept units with the lowest priority; ties at random.

  Already-dropped units get +inf priority so they are never chosen again (and
  stay 0 because the result multiplies the old mask).
  """
  priority = jnp.where(mask > 0, priority, jnp.inf)
  tie_break = jax.random.uniform(key, priority.shape)
  order = jnp.lexsort((tie_break, priority))  # primary key: priority
  rank = jnp.zeros_like(order).at[order].set(jnp.arange(order.size, dtype=order.dtype))
  return mask * (rank >= n_drop).astype(mask.dtype)


def update_mask(masks: Masks, scores: tuple[jax.Array, ...], metric: str, fraction, key: jax.Array) -> Masks:
  """Drops a fraction of the remaining units by `metric`; pure and jittable (metric static).

  Global metrics drop int(fraction * remaining) units over all masked layers
  together, layer-wise metrics int(fraction * remaining_in_layer) in each
  layer. At least one unit is dropped (per layer for layer-wise metrics), but
  never the last remaining one (of the network, or of a layer for layer-wise
  metrics), so the cycle count is finite and the network keeps a path.
  """
  spec = check_metric(metric)
  if len(masks) != len(scores):
    raise ValueError(f'{len(masks)} mask vectors but {len(scores)} score vectors')
  for m, s in zip(masks, scores):
    if m.shape != s.shape:
      raise ValueError(f'mask shape {m.shape} != score shape {s.shape}')
  if spec.score == 'random':
    priorities = [jnp.zeros_like(m) for m in masks]  # all tied: the tie-break is the draw
  elif spec.drop == 'lowest':
    priorities = [jnp.asarray(s, jnp.float32) for s in scores]
  else:
    priorities = [-jnp.asarray(s, jnp.float32) for s in scores]

  def n_drop_of(mask):
    remaining = mask.sum()
    n = jnp.maximum(num_to_drop(fraction, remaining), 1)
    return jnp.minimum(n, remaining.astype(jnp.int32) - 1)

  if spec.layerwise:
    keys = jax.random.split(key, len(masks))
    return tuple(_drop_ranked(m, p, n_drop_of(m), k) for m, p, k in zip(masks, priorities, keys))

  sizes = [m.size for m in masks]
  flat_mask = jnp.concatenate(masks)
  flat = _drop_ranked(flat_mask, jnp.concatenate(priorities), n_drop_of(flat_mask), key)
  splits = np.cumsum(sizes)[:-1].tolist()
  return tuple(jnp.split(flat, splits))


def units_per_layer(masks: Masks) -> list[int]:
  return [int(round(float(m.sum()))) for m in masks]


def fraction_remaining(masks: Masks) -> float:
  total = sum(m.size for m in masks)
  return sum(units_per_layer(masks)) / total
