"""The paper's oracle baseline: greedy pruning by the training loss itself.

At a DropNet cycle, with the trained parameters and no retraining, the oracle
removes the single unit whose removal gives the lowest training loss, then
repeats from the new mask, until the cycle's count is dropped. The count is the
global criteria's rule (`mask_ops.drop_count`): max(floor(fraction * remaining),
1), capped at remaining - 1 so the network keeps a unit.

Each greedy step scores every unit of the network at once: one candidate mask
per unit (the current mask with that unit also set to 0), with the loss vmapped
over the candidates. The candidate set has the same shape at every step; units
that are already dropped get loss +inf, so the whole greedy loop is one
compiled `lax.while_loop` and nothing recompiles between steps, fractions or
cycles. The loss is the mean softmax cross-entropy over the examples, summed
in `lax.scan` over padded example batches (`batch_size`), with the candidates
processed `candidate_chunk` at a time (`lax.map`), so memory is bounded by
candidate_chunk x batch_size forward passes. (Layers before the first mask do
not depend on the candidate mask, so vmap computes them once per batch.)

Ties: the lowest loss wins and equal losses go to the lowest flat unit index
(layers in mask order, units in order within a layer). A kept unit whose
removal gives a NaN loss counts as +inf (never preferred to a finite loss).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dropnet_jax import theta as theta_lib
from dropnet_jax.models.layers import Masks
from dropnet_jax.pruning.masks import drop_count

DEFAULT_CANDIDATE_CHUNK = 64


class OracleResult(NamedTuple):
  masks: Masks  # the new mask (float32 vectors, one per masked layer)
  order: jax.Array  # (total_units,) int32 flat index dropped at each step; -1 after the last step
  losses: jax.Array  # (total_units,) float32 training loss after each step's removal; nan after the last
  num_dropped: jax.Array  # int32 scalar: the cycle's count


def _split(flat: jax.Array, sizes: tuple[int, ...]) -> Masks:
  return tuple(jnp.split(flat, np.cumsum(sizes)[:-1].tolist()))


def _variables(theta, extra_variables) -> dict[str, Any]:
  """The dict `apply_fn` gets: θ's variables (`dropnet_jax.theta`) and any extra collections."""
  return {**theta_lib.variables(theta), **(extra_variables or {})}


def _logits(apply_fn, variables, images, masks):
  out = apply_fn(variables, images, masks)
  return out[0] if isinstance(out, tuple) else out


def _candidate_losses_flat(apply_fn, variables, flat_mask, sizes, images, labels, batch_size, candidate_chunk):
  """Mean training loss with each single unit removed from `flat_mask` (N,), in flat order."""
  n_units = flat_mask.shape[0]
  n = images.shape[0]
  num_batches = math.ceil(n / batch_size)
  pad = num_batches * batch_size - n
  idx = jnp.concatenate([jnp.arange(n), jnp.zeros((pad,), jnp.int32)]).reshape(num_batches, batch_size)
  weights = jnp.concatenate([jnp.ones((n,), jnp.float32), jnp.zeros((pad,), jnp.float32)])
  weights = weights.reshape(num_batches, batch_size)
  num_chunks = math.ceil(n_units / candidate_chunk)
  # Candidate j removes unit j; the padding candidates (j >= N) remove nothing and are discarded.
  candidates = jnp.arange(num_chunks * candidate_chunk, dtype=jnp.int32).reshape(num_chunks, candidate_chunk)
  unit_index = jnp.arange(n_units, dtype=jnp.int32)

  def loss_sum(j, x, y, w):
    mask = flat_mask * (unit_index != j).astype(flat_mask.dtype)
    logits = _logits(apply_fn, variables, x, _split(mask, sizes))
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), y)
    return (w * ce).sum()

  def per_batch(total, batch):
    b_idx, w = batch
    x, y = images[b_idx], labels[b_idx]
    chunk_fn = lambda js: jax.vmap(loss_sum, in_axes=(0, None, None, None))(js, x, y, w)
    sums = jax.lax.map(chunk_fn, candidates).reshape(-1)[:n_units]
    return total + sums, None

  total, _ = jax.lax.scan(per_batch, jnp.zeros((n_units,), jnp.float32), (idx, weights))
  return total / n


_candidate_losses_jit = jax.jit(_candidate_losses_flat, static_argnums=(0, 3, 6, 7))


@functools.partial(jax.jit, static_argnames=('apply_fn', 'sizes', 'batch_size', 'candidate_chunk'))
def _greedy(apply_fn, variables, flat_mask, fraction, images, labels, *, sizes, batch_size, candidate_chunk):
  n_units = flat_mask.shape[0]
  count = drop_count(flat_mask, fraction)

  def body(state):
    step, mask, order, losses = state
    cand = _candidate_losses_flat(apply_fn, variables, mask, sizes, images, labels, batch_size, candidate_chunk)
    kept = mask > 0
    score = jnp.where(kept & ~jnp.isnan(cand), cand, jnp.inf)
    j = jnp.argmin(score)  # first minimum: ties go to the lowest index
    j = jnp.where(kept[j], j, jnp.argmax(kept))  # all kept losses inf/nan: the first kept unit
    mask = mask.at[j].set(0.0)
    return step + 1, mask, order.at[step].set(j.astype(jnp.int32)), losses.at[step].set(cand[j])

  init = (jnp.zeros((), jnp.int32), flat_mask, jnp.full((n_units,), -1, jnp.int32),
          jnp.full((n_units,), jnp.nan, jnp.float32))
  _, mask, order, losses = jax.lax.while_loop(lambda s: s[0] < count, body, init)
  return mask, order, losses, count


def _prepare(masks, images, labels, batch_size, max_examples, candidate_chunk):
  masks = tuple(jnp.asarray(m, jnp.float32) for m in masks)
  if not masks or any(m.ndim != 1 for m in masks):
    raise ValueError('masks must be a non-empty tuple of 1-D vectors')
  if images.shape[0] != labels.shape[0]:
    raise ValueError(f'{images.shape[0]} images but {labels.shape[0]} labels')
  if max_examples is not None:
    if max_examples < 1:
      raise ValueError(f'max_examples must be positive, got {max_examples}')
    images, labels = images[:max_examples], labels[:max_examples]
  n = images.shape[0]
  if n == 0:
    raise ValueError('no examples to evaluate the oracle loss on')
  if batch_size < 1:
    raise ValueError(f'batch_size must be positive, got {batch_size}')
  sizes = tuple(int(m.shape[0]) for m in masks)
  total = sum(sizes)
  chunk = DEFAULT_CANDIDATE_CHUNK if candidate_chunk is None else candidate_chunk
  if chunk < 1:
    raise ValueError(f'candidate_chunk must be positive, got {candidate_chunk}')
  return (masks, images, jnp.asarray(labels, jnp.int32), sizes, min(batch_size, n), min(chunk, total))


def greedy_oracle(apply_fn: Callable, params, masks: Masks, images: jax.Array, labels: jax.Array, fraction, *,
                  batch_size: int = 256, max_examples: int | None = None, candidate_chunk: int | None = None,
                  extra_variables: dict[str, Any] | None = None) -> OracleResult:
  """`oracle_mask` with its trace: the units dropped, in order, and the loss after each step."""
  masks, images, labels, sizes, batch_size, chunk = _prepare(masks, images, labels, batch_size, max_examples,
                                                             candidate_chunk)
  flat, order, losses, count = _greedy(apply_fn, _variables(params, extra_variables), jnp.concatenate(masks),
                                       jnp.asarray(fraction, jnp.float32), images, labels, sizes=sizes,
                                       batch_size=batch_size, candidate_chunk=chunk)
  return OracleResult(_split(flat, sizes), order, losses, count)


def oracle_mask(apply_fn: Callable, params, masks: Masks, images: jax.Array, labels: jax.Array, fraction, *,
                batch_size: int = 256, max_examples: int | None = None, candidate_chunk: int | None = None,
                extra_variables: dict[str, Any] | None = None) -> Masks:
  """The oracle's next mask: greedily drops the units whose removal hurts the training loss least.

  Args:
    apply_fn: `model.apply`; called as `apply_fn(variables, images, masks)` (so `train=False`) and
      returning `(logits, stats)` or logits. Static under jit: pass the same bound method each cycle.
    params: the trained θ (used as it is; no retraining between greedy steps): a params tree, or a
      variables dict with 'batch_stats' for batch-norm models (`dropnet_jax.theta`).
    masks: the current mask, one float vector per masked layer (1 kept, 0 dropped).
    images, labels: the training examples the loss is measured on (uint8 images, int labels).
    fraction: the fraction of remaining units to drop (the cycle count as for the global metrics).
    batch_size: examples per forward pass (padded batches; the padding has weight 0).
    max_examples: use only the first `max_examples` examples (default all); shuffle beforehand for a
      random subset.
    candidate_chunk: candidate masks vmapped together (default 64); memory ~ candidate_chunk x batch_size.
    extra_variables: other variable collections, e.g. `{'batch_stats': ...}` beside a bare params tree.

  Returns:
    The new masks (float32). Pure: the same inputs give the same mask; ties go to the lowest flat
    unit index (layers in mask order). Already-dropped units stay dropped and are never chosen.
  """
  return greedy_oracle(apply_fn, params, masks, images, labels, fraction, batch_size=batch_size,
                       max_examples=max_examples, candidate_chunk=candidate_chunk,
                       extra_variables=extra_variables).masks


def candidate_losses(apply_fn: Callable, params, masks: Masks, images: jax.Array, labels: jax.Array, *,
                     batch_size: int = 256, max_examples: int | None = None, candidate_chunk: int | None = None,
                     extra_variables: dict[str, Any] | None = None) -> tuple[jax.Array, ...]:
  """Per layer, the mean training loss with each single unit (additionally) removed.

  Already-dropped units get the loss of `masks` itself (removing them changes nothing);
  the greedy step treats them as +inf.
  """
  masks, images, labels, sizes, batch_size, chunk = _prepare(masks, images, labels, batch_size, max_examples,
                                                             candidate_chunk)
  flat = _candidate_losses_jit(apply_fn, _variables(params, extra_variables), jnp.concatenate(masks), sizes, images, labels,
            batch_size, chunk)
  return _split(flat, sizes)


def mask_similarity(masks_a: Masks, masks_b: Masks) -> float:
  """Fraction of `masks_b`'s surviving units that `masks_a` also keeps.

  |kept_a ∩ kept_b| / |kept_b|, over all layers together. Pass the oracle's mask as `masks_b`
  (the reference). When both keep the same number of units (as after a cycle from a common
  mask) this is symmetric and equals the overlap fraction; 1.0 means the same units survive.
  Raises ValueError when the shapes differ or `masks_b` keeps no unit.
  """
  if len(masks_a) != len(masks_b):
    raise ValueError(f'{len(masks_a)} vs {len(masks_b)} mask vectors')
  kept_a, kept_b = [], []
  for a, b in zip(masks_a, masks_b):
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
      raise ValueError(f'mask shapes differ: {a.shape} vs {b.shape}')
    kept_a.append(a.reshape(-1) > 0)
    kept_b.append(b.reshape(-1) > 0)
  kept_a, kept_b = np.concatenate(kept_a), np.concatenate(kept_b)
  n_b = int(kept_b.sum())
  if n_b == 0:
    raise ValueError('the reference mask (masks_b) keeps no unit')
  return float((kept_a & kept_b).sum()) / n_b


ORACLE = 'oracle'  # the criterion's registered name


def similarity_records(records: list[dict]) -> list[dict]:
  """One record per non-oracle (seed, metric, cycle) of a run that includes the oracle, with
  `oracle_similarity`: `mask_similarity` of its mask to the oracle's at the same seed and cycle."""
  from dropnet_jax.pruning.masks import masks_from_strings
  oracle_masks = {(r['seed'], r['cycle']): r['mask'] for r in records if r['metric'] == ORACLE}
  out = []
  for r in records:
    ref = oracle_masks.get((r['seed'], r['cycle']))
    if r['metric'] == ORACLE or ref is None:
      continue
    out.append({'seed': r['seed'], 'metric': r['metric'], 'cycle': r['cycle'],
                'fraction_remaining': r['fraction_remaining'],
                'oracle_similarity': mask_similarity(masks_from_strings(r['mask']), masks_from_strings(ref))})
  return out
