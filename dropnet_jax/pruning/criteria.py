"""What a cycle drops: every criterion is one registered function of (trained state, stat sums, mask, key).

The loop (`dropnet_jax.loop.driver`) knows criteria only by name. A criterion is
`fn(inputs: PruneInputs, context: Context) -> new mask`: `inputs` are the
trial's own (trained θ, per-unit stat sums of its scoring pass, its current
mask, a PRNG key fixed by (seed, criterion, cycle), the fraction p to drop);
`context` holds what every trial shares (the model's apply function and the
training data, for criteria that evaluate the network, like the oracle). It
returns the next mask, with the same structure; dropped units stay dropped.
Adding a criterion is a function here, `@register(name)`, and its test.

Node/filter criteria (masks: one 0/1 vector per masked layer):
  min, max, random            global: the p-fraction of all remaining units with
                              the lowest / highest mean |activation|, or at random
  min_layer, max_layer,       the same fraction inside every layer
  random_layer
  apoz, apoz_layer            APoZ (Hu et al. 2016): the units most often exactly zero
  oracle                      greedy by training loss (`dropnet_jax.pruning.oracle`)
  min_official, max_official, the official notebook's selection rule (`getmask`), for
  min_layer_official,         reproducing its curves: see `drop_official`
  max_layer_official

Weight criteria (masks: a 0/1 array per prunable kernel, `weight_masks`), the
semantics of `torch.nn.utils.prune` (`weight_criteria`): global_l1, layer_l1,
global_random, layer_random.

The exact rule: drop max(floor(p * remaining), 1) units (per layer for the
layer-wise ones), never the last remaining unit (of the network, or of a
layer), ties broken at random by the key.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dropnet_jax import theta as theta_lib
from dropnet_jax.pruning import oracle

from dropnet_jax.pruning import weight_criteria
from dropnet_jax.models.layers import Masks, StatSums
from dropnet_jax.pruning.masks import drop_count, num_to_drop


class PruneInputs(NamedTuple):
  """One trial's side of a criterion call."""
  theta: Any  # the trained θ the cycle scores (params tree, or variables dict with batch stats)
  sums: StatSums  # per-unit post-activation sums of the scoring pass
  mask: Any  # the current mask
  key: jax.Array  # tie-breaks and random draws
  fraction: float  # p: fraction of the remaining units to drop


@dataclasses.dataclass(frozen=True)
class Context:
  """What every trial of a run shares: the model and the training data (for criteria that evaluate)."""
  apply_fn: Callable | None = None
  train_images: Any = None
  train_labels: Any = None
  oracle_examples: int | None = None


Criterion = Callable[[PruneInputs, Context], Any]
GRANULARITIES = ('unit', 'weight')
_REGISTRY: dict[str, tuple[Criterion, str]] = {}


def register(name: str, granularity: str = 'unit', *, replace: bool = False) -> Callable[[Criterion], Criterion]:
  """Decorator: makes `fn` the criterion called `name` (the --metrics value and the records' `metric`)
  for masks of `granularity` ('unit': node/filter masks; 'weight': weight masks).

  A name already taken is refused (two modules claiming one name is a mistake), unless `replace=True`:
  then `fn` takes its place, so a notebook cell that defines a criterion can run again. Criteria are
  looked up by name at every use, so the next run calls the new function."""
  if granularity not in GRANULARITIES:
    raise ValueError(f'granularity must be one of {GRANULARITIES}, got {granularity!r}')

  def add(fn: Criterion) -> Criterion:
    if name in _REGISTRY and not replace:
      raise ValueError(f'criterion {name!r} is registered twice (register(..., replace=True) redefines it)')
    _REGISTRY[name] = (fn, granularity)
    return fn
  return add


def get(name: str, granularity: str | None = None) -> Criterion:
  """The criterion `name`; with `granularity`, one for that kind of mask (ValueError naming the choices)."""
  if name not in _REGISTRY or (granularity is not None and _REGISTRY[name][1] != granularity):
    raise ValueError(f'unknown metric {name!r}; choose from {names(granularity)}')
  return _REGISTRY[name][0]


def names(granularity: str | None = None) -> list[str]:
  return sorted(n for n, (_, g) in _REGISTRY.items() if granularity in (None, g))


# -- activation statistics ----------------------------------------------------------------------


def mean_abs(sums: StatSums) -> tuple[jax.Array, ...]:
  """Per-unit mean |activation| over the scoring pass (the paper's score)."""
  return tuple(s / sums.count for s in sums.abs_sum)


def apoz(sums: StatSums) -> tuple[jax.Array, ...]:
  """Per-unit average percentage of zeros."""
  return tuple(s / sums.count for s in sums.zero_sum)


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


def _check_shapes(masks: Masks, scores) -> None:
  if len(masks) != len(scores):
    raise ValueError(f'{len(masks)} mask vectors but {len(scores)} score vectors')
  for m, s in zip(masks, scores):
    if m.shape != s.shape:
      raise ValueError(f'mask shape {m.shape} != score shape {s.shape}')


def _flat(masks: Masks):
  """Concatenates per-layer vectors and returns a function splitting a flat vector back."""
  splits = np.cumsum([m.size for m in masks])[:-1].tolist()
  return jnp.concatenate(masks), lambda flat: tuple(jnp.split(flat, splits))


@jax.jit
def drop_lowest(masks: Masks, priorities: tuple[jax.Array, ...], fraction, key: jax.Array) -> Masks:
  """The exact global rule: drops `drop_count` kept units with the lowest priority over all layers."""
  _check_shapes(masks, priorities)
  flat_mask, unflatten = _flat(masks)
  flat_priority = jnp.concatenate([jnp.asarray(p, jnp.float32) for p in priorities])
  return unflatten(_drop_ranked(flat_mask, flat_priority, drop_count(flat_mask, fraction), key))


@jax.jit
def drop_lowest_per_layer(masks: Masks, priorities: tuple[jax.Array, ...], fraction, key: jax.Array) -> Masks:
  """The exact layer-wise rule: in every layer, drops `drop_count` of its kept units, lowest priority first."""
  _check_shapes(masks, priorities)
  keys = jax.random.split(key, len(masks))
  return tuple(_drop_ranked(m, jnp.asarray(p, jnp.float32), drop_count(m, fraction), k)
               for m, p, k in zip(masks, priorities, keys))


def _activation_criterion(name: str, score: Callable[[StatSums], tuple] | None, sign: float,
                          layerwise: bool) -> None:
  """Registers a criterion dropping the lowest `sign * score` (all tied, so random, without a score)."""
  rule = drop_lowest_per_layer if layerwise else drop_lowest

  def criterion(inputs: PruneInputs, context: Context) -> Masks:
    del context
    if score is None:
      priorities = tuple(jnp.zeros_like(m) for m in inputs.mask)  # all tied: the tie-break is the draw
    else:
      priorities = tuple(sign * s for s in score(inputs.sums)) if sign < 0 else score(inputs.sums)
    return rule(tuple(inputs.mask), priorities, inputs.fraction, inputs.key)

  criterion.__name__ = criterion.__qualname__ = name
  register(name)(criterion)


for _suffix, _layerwise in (('', False), ('_layer', True)):
  _activation_criterion('min' + _suffix, mean_abs, 1.0, _layerwise)
  _activation_criterion('max' + _suffix, mean_abs, -1.0, _layerwise)
  _activation_criterion('random' + _suffix, None, 1.0, _layerwise)
  _activation_criterion('apoz' + _suffix, apoz, -1.0, _layerwise)  # the units most often zero go first


# -- the official notebook's selection rule --------------------------------------------------


def _drop_official(mask: jax.Array, priority: jax.Array, layer: jax.Array, fraction, key: jax.Array) -> jax.Array:
  """`getmask` of the official DropNet notebook on one flat vector (lowest priority first).

  It thresholds at the (k+1)-th lowest kept value, k = floor(p * kept), so k+1
  units (more with ties) are candidates, then spends the budget of
  max(k, 1) drops layer by layer in layer order, in random order inside a
  layer. Against the exact rule, one candidate too many competes and the
  earliest layers go first: the last layer holding candidates keeps a random
  one of them (often not the highest-priority one), and a later layer is never
  emptied while an earlier layer has candidates. (The notebook can also drop a
  network's last unit; like the exact rule, this never does.)
  """
  kept = mask > 0
  n = kept.sum().astype(jnp.int32)
  threshold_index = jnp.clip(num_to_drop(fraction, n), 0, jnp.maximum(n - 1, 0))
  threshold = jnp.sort(jnp.where(kept, priority, jnp.inf))[threshold_index]
  candidate = kept & (priority <= threshold)
  n_drop = jnp.minimum(drop_count(mask, fraction), candidate.sum().astype(jnp.int32))
  order = jnp.where(candidate, layer.astype(jnp.float32), jnp.inf)  # layer by layer; random inside a layer
  return _drop_ranked(mask, order, n_drop, key)


@jax.jit
def drop_official(masks: Masks, priorities: tuple[jax.Array, ...], fraction, key: jax.Array) -> Masks:
  """The official global rule over all layers (see `_drop_official`)."""
  _check_shapes(masks, priorities)
  flat_mask, unflatten = _flat(masks)
  layer = jnp.concatenate([jnp.full(m.shape, i, jnp.int32) for i, m in enumerate(masks)])
  flat_priority = jnp.concatenate([jnp.asarray(p, jnp.float32) for p in priorities])
  return unflatten(_drop_official(flat_mask, flat_priority, layer, fraction, key))


@jax.jit
def drop_official_per_layer(masks: Masks, priorities: tuple[jax.Array, ...], fraction, key: jax.Array) -> Masks:
  """The official layer-wise rule: threshold and budget inside every layer."""
  _check_shapes(masks, priorities)
  keys = jax.random.split(key, len(masks))
  return tuple(_drop_official(m, jnp.asarray(p, jnp.float32), jnp.zeros(m.shape, jnp.int32), fraction, k)
               for m, p, k in zip(masks, priorities, keys))


def _official_criterion(name: str, sign: float, layerwise: bool) -> None:
  rule = drop_official_per_layer if layerwise else drop_official

  def criterion(inputs: PruneInputs, context: Context) -> Masks:
    del context
    return rule(tuple(inputs.mask), tuple(sign * s for s in mean_abs(inputs.sums)), inputs.fraction, inputs.key)

  criterion.__name__ = criterion.__qualname__ = name
  register(name)(criterion)


for _suffix, _layerwise in (('', False), ('_layer', True)):
  _official_criterion(f'min{_suffix}_official', 1.0, _layerwise)
  _official_criterion(f'max{_suffix}_official', -1.0, _layerwise)


# -- weights (unstructured) ----------------------------------------------------------------------


def _weight_criterion(name: str) -> None:
  rule = weight_criteria.WEIGHT_CRITERIA[name]

  def criterion(inputs: PruneInputs, context: Context):
    del context
    return rule(theta_lib.params(inputs.theta), inputs.mask, float(inputs.fraction), inputs.key)

  criterion.__name__ = criterion.__qualname__ = name
  register(name, 'weight')(criterion)


for _name in weight_criteria.WEIGHT_CRITERIA:
  _weight_criterion(_name)


# -- evaluating the network -----------------------------------------------------------------------


@register('oracle')
def oracle_criterion(inputs: PruneInputs, context: Context) -> Masks:
  """The paper's oracle: greedily drops the units whose removal raises the training loss least,
  with the trained θ and no retraining (`dropnet_jax.pruning.oracle`). Deterministic: the key is unused."""
  return oracle.oracle_mask(context.apply_fn, inputs.theta, tuple(inputs.mask), context.train_images,
                            context.train_labels, inputs.fraction, max_examples=context.oracle_examples)
