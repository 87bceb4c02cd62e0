"""Weight pruning criteria: pure, jittable `criterion(params, wmask, fraction, key) -> wmask`.

Each criterion prunes a fraction of the *remaining* (kept) weights of the
masked leaves (see `dropnet_jax.pruning.weight_masks` for the mask representation),
with the semantics of `torch.nn.utils.prune`:

  * `global_l1`: the `round(fraction * remaining)` kept weights with the
    smallest |w| over all masked leaves together
    (`prune.global_unstructured(..., pruning_method=prune.L1Unstructured)`);
  * `layer_l1`: `round(fraction * remaining_in_leaf)` per leaf
    (`prune.l1_unstructured` on each tensor);
  * `global_random`, `layer_random`: the same counts, chosen uniformly at
    random among the kept weights (`RandomUnstructured`): the control.

Counts. torch computes `round(amount * n)` in Python: the float64 product,
rounded half to even (`prune._compute_nparams_toprune`), where n is the
number of still-unpruned entries (its `PruningContainer` applies a new
method to the `mask == 1` slice only), so three prunes of 0.2 leave
0.8^3 up to that rounding. The kept count is traced (it depends on the
mask), and float32 cannot reproduce a float64 product (0.3 * 95 is
28.499999999999996 in float64, so torch prunes 28; in float32 it is
28.500001, which rounds to 29), so when `fraction` is a Python float the
count is computed on the host from the exact double (`jax.pure_callback`;
jit with `fraction` static; one int per tensor crosses to the host). A
traced `fraction` (a jax array) is float32 and gets `round(fraction * n)`
in float32: equal except when the product lies within float32 rounding of a
half-integer.

Ties. torch takes the k smallest with `torch.topk`, whose choice among equal
magnitudes is an artefact of its selection algorithm (neither the lowest
index nor random: on tensors of equal values it picks a run from the
middle). Here ties at the threshold are broken by uniform 32-bit draws
from `key` (equal draws, then position), or by flat position in jax's leaf
order when `key` is None. With continuous weights a tie exactly at the
threshold is rare (float32 duplicates exist but seldom sit at the k-th
value); ties are systematic with equal values (zero-initialised biases, if
selected).
Already-pruned weights are never chosen again and the result multiplies the
old mask, so masks only shrink.
"""

from __future__ import annotations

import numbers
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from dropnet_jax.pruning.weight_masks import WeightMask, select_masked

Criterion = Callable[..., WeightMask]


def _check_fraction(fraction):
  """A Python float in [0, 1] (torch's rule for a fractional amount), or a jax/numpy array (traced)."""
  if isinstance(fraction, (bool, numbers.Integral)):
    # torch reads an int amount as an absolute count; only fractions are supported here.
    raise TypeError(f'fraction must be a float in [0, 1], got the int {fraction!r}')
  if isinstance(fraction, numbers.Real):
    fraction = float(fraction)
    if not 0.0 <= fraction <= 1.0:
      raise ValueError(f'fraction must be in [0, 1], got {fraction}')
  return fraction


def torch_prune_count(fraction: float, remaining: int) -> int:
  """torch's count for a float amount: round(fraction * remaining), float64, half to even (host side)."""
  return int(round(_check_fraction(fraction) * int(remaining)))


def prune_count(fraction, remaining: jax.Array) -> jax.Array:
  """`torch_prune_count` for traced int `remaining` (any shape), as int32; jittable and vmappable.

  Python float `fraction`: exact (host callback on the float64 product).
  Array `fraction`: float32 on the device (see the module docstring).
  """
  fraction = _check_fraction(fraction)
  remaining = jnp.asarray(remaining, jnp.int32)
  if isinstance(fraction, float):
    f = fraction

    def host(r):
      # numpy's float64 product and round-half-even are Python's round(f * r).
      return np.round(f * np.asarray(r, np.float64)).astype(np.int32)

    return jax.pure_callback(host, jax.ShapeDtypeStruct(remaining.shape, jnp.int32), remaining,
                             vmap_method='expand_dims')
  f32 = jnp.asarray(fraction, jnp.float32)
  count = jnp.round(f32 * remaining.astype(jnp.float32)).astype(jnp.int32)
  return jnp.clip(count, 0, remaining)  # a traced fraction is not range-checked


def _ordered_bits(x: jax.Array) -> jax.Array:
  """float32 -> uint32 with the same order (negatives flipped, positives above them)."""
  b = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
  return jnp.where(b >> 31 == 1, ~b, b | jnp.uint32(0x80000000))


def _kth_smallest(keys: list[jax.Array], valid: list[jax.Array], k: jax.Array) -> jax.Array:
  """Per segment i, the smallest t with #{valid keys_i <= t} >= k[i] (uint32 keys; 0 when k[i] <= 0).

  A bisection over the 32-bit key range, all segments in one loop: 32
  counting passes, O(n) each and parallel, instead of a sort (XLA:CPU's sort
  of a few million floats takes seconds, jax.random.permutation several).
  """
  def body(_, lo_hi):
    lo, hi = lo_hi
    mid = lo + (hi - lo) // 2
    counts = jnp.stack([jnp.sum(v & (x <= mid[i]), dtype=jnp.int32) for i, (x, v) in enumerate(zip(keys, valid))])
    enough = counts >= k
    return jnp.where(enough, lo, mid + 1), jnp.where(enough, mid, hi)

  n = len(keys)
  # The first step outside the loop: its carry then has the inputs' types, which inside shard_map
  # include the mesh axes they vary over (a constant initial carry would not match the body's output).
  first = body(0, (jnp.zeros((n,), jnp.uint32), jnp.full((n,), 0xFFFFFFFF, jnp.uint32)))
  lo, _ = jax.lax.fori_loop(1, 32, body, first)
  return lo


def _take_lowest(keys, valid, k):
  """(chosen, tied, still_needed) per segment: the valid entries strictly below the k-th smallest key,
  the valid entries equal to it, and how many of those tied entries complete the k."""
  t = _kth_smallest(keys, valid, k)
  below = [v & (x < t[i]) for i, (x, v) in enumerate(zip(keys, valid))]
  tied = [v & (x == t[i]) for i, (x, v) in enumerate(zip(keys, valid))]
  return below, tied, k - jnp.stack([jnp.sum(b, dtype=jnp.int32) for b in below])


def _prune_lowest(masks: list[jax.Array], priorities: list[jax.Array], counts: jax.Array,
                  key: jax.Array | None) -> list[jax.Array]:
  """Per segment (flat vectors), zeroes the `counts[i]` kept entries of lowest priority.

  Ties at the threshold: with a key, the lowest of uniform 32-bit draws (and
  among equal draws, which are rare, the first in position); without one,
  the first in position. Already-pruned entries are never chosen.
  """
  kept = [m > 0 for m in masks]
  chosen, tied, need = _take_lowest([_ordered_bits(p) for p in priorities], kept, counts)
  if key is not None:
    keys = jax.random.split(key, len(masks))
    draws = [jax.random.bits(k, m.shape, jnp.uint32) for k, m in zip(keys, masks)]
    chosen2, tied, need = _take_lowest(draws, tied, need)
    chosen = [a | b for a, b in zip(chosen, chosen2)]
  out = []
  for i, (m, c, t) in enumerate(zip(masks, chosen, tied)):
    pruned = c | (t & (jnp.cumsum(t, dtype=jnp.int32) <= need[i]))
    out.append(m * (~pruned).astype(m.dtype))
  return out


def _prune(params, wmask: WeightMask, fraction, key, *, scores: str, layerwise: bool) -> WeightMask:
  masks, treedef = jax.tree.flatten(wmask)
  if not masks:
    raise ValueError('empty weight mask')
  flat_masks = [jnp.reshape(m, (-1,)) for m in masks]
  if scores == 'l1':
    priorities = [jnp.abs(jnp.reshape(w, (-1,))).astype(jnp.float32)
                  for w in jax.tree.leaves(select_masked(params, wmask))]
  else:  # random: all tied, so the key's draws alone decide
    if key is None:
      raise ValueError('random criteria need a PRNG key')
    priorities = [jnp.zeros(m.shape, jnp.float32) for m in flat_masks]
  if not layerwise:  # one segment: everything together
    flat_masks, priorities = [jnp.concatenate(flat_masks)], [jnp.concatenate(priorities)]
  remaining = jnp.stack([jnp.sum(m > 0, dtype=jnp.int32) for m in flat_masks])
  new = _prune_lowest(flat_masks, priorities, prune_count(fraction, remaining), key)
  if not layerwise:
    new = jnp.split(new[0], np.cumsum([m.size for m in masks])[:-1].tolist())
  return jax.tree.unflatten(treedef, [jnp.reshape(n, m.shape).astype(m.dtype) for n, m in zip(new, masks)])


def global_l1(params, wmask: WeightMask, fraction, key: jax.Array | None = None) -> WeightMask:
  """Prunes round(fraction * kept) kept weights of smallest |w| over all masked leaves together."""
  return _prune(params, wmask, fraction, key, scores='l1', layerwise=False)


def layer_l1(params, wmask: WeightMask, fraction, key: jax.Array | None = None) -> WeightMask:
  """Prunes round(fraction * kept_in_leaf) kept weights of smallest |w| in each masked leaf."""
  return _prune(params, wmask, fraction, key, scores='l1', layerwise=True)


def global_random(params, wmask: WeightMask, fraction, key: jax.Array) -> WeightMask:
  """Prunes round(fraction * kept) kept weights drawn uniformly over all masked leaves (params unused)."""
  return _prune(params, wmask, fraction, key, scores='random', layerwise=False)


def layer_random(params, wmask: WeightMask, fraction, key: jax.Array) -> WeightMask:
  """Prunes round(fraction * kept_in_leaf) kept weights drawn uniformly in each masked leaf."""
  return _prune(params, wmask, fraction, key, scores='random', layerwise=True)


WEIGHT_CRITERIA: dict[str, Criterion] = {
    'global_l1': global_l1,
    'layer_l1': layer_l1,
    'global_random': global_random,
    'layer_random': layer_random,
}


def check_weight_criterion(name: str) -> Criterion:
  if name not in WEIGHT_CRITERIA:
    raise ValueError(f'unknown weight criterion {name!r}; choose from {sorted(WEIGHT_CRITERIA)}')
  return WEIGHT_CRITERIA[name]
