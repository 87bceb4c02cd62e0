"""The pieces of a pass over device-resident data: batches, the shuffle, the loss and the sums.

Everything here runs inside the jitted epoch and evaluation programs of
`train.Trainer`: fixed-shape padded batches (weight 0 for padding, so one
compiled step serves every batch), `jax.random.permutation`'s exact order
computed with cheaper sorts, fast row gathers, the cross-entropy with an
elementwise gradient, and per-row accumulators reduced once per pass.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dropnet_jax.models.layers import Masks



def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-example softmax cross-entropy with integer labels.

  logsumexp minus the label's logit picked by a one-hot product: the same
  value as optax's version, but the gradient is elementwise (softmax - one
  hot) instead of a gather/scatter pair, which is cheaper inside a scan step.
  """
  logits = logits.astype(jnp.float32)
  one_hot = jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype)
  return jax.nn.logsumexp(logits, axis=-1) - jnp.sum(one_hot * logits, axis=-1)


def padded_batches(order: jax.Array, batch_size: int) -> tuple[jax.Array, jax.Array]:
  """Splits example indices into full batches; the last is padded with weight 0.

  Keeping every batch the same shape keeps one compiled step, and weight 0
  makes the padding invisible to losses, gradients and statistics.
  """
  n = order.shape[0]
  num_batches = math.ceil(n / batch_size)
  pad = num_batches * batch_size - n
  idx = jnp.concatenate([order, jnp.zeros((pad,), order.dtype)]).reshape(num_batches, batch_size)
  weights = jnp.concatenate([jnp.ones((n,), jnp.float32), jnp.zeros((pad,), jnp.float32)])
  return idx, weights.reshape(num_batches, batch_size)


def shuffle_order(key: jax.Array, n: int) -> jax.Array:
  """Exactly `jax.random.permutation(key, n)` (int32), about 3x faster on CPU.

  jax shuffles by sorting with fresh random uint32 keys a few times (a stable
  sort of the current order by each round's keys). XLA's CPU sort is fast for
  one operand of a primitive type but calls a generated comparator for
  key/value pairs, so each stable key/value sort here is done as two
  single-operand uint32 sorts (LSD radix on the 16-bit halves, the position
  packed into the low 16 bits), which gives the same order. Needs n <= 2^16;
  larger n use jax.random.permutation itself. Tested against it.
  """
  if n > 1 << 16:
    return jax.random.permutation(key, n)
  pos = jnp.arange(n, dtype=jnp.uint32)

  def stable_argsort(keys):
    by_low = jnp.sort(((keys & 0xFFFF) << 16) | pos) & 0xFFFF
    by_high = jnp.sort(((keys[by_low] >> 16) << 16) | pos) & 0xFFFF
    return by_low[by_high]

  x = jnp.arange(n, dtype=jnp.int32)
  num_rounds = int(np.ceil(3 * np.log(max(1, n)) / np.log(np.iinfo(np.uint32).max)))  # as jax's _shuffle
  for _ in range(num_rounds):
    key, subkey = jax.random.split(key)
    x = x[stable_argsort(jax.random.bits(subkey, (n,), jnp.uint32))]
  return x


def take_rows(a: jax.Array, idx: jax.Array) -> jax.Array:
  """a[idx] along axis 0 for in-range indices, as whole rows of a 2-D view.

  Row gathers of the flattened array, with 'clip' instead of the default
  mode's bounds handling, run many times faster on XLA:CPU than the
  element-wise gather of a[idx] on the N-d array.
  """
  rows = jnp.take(a.reshape(a.shape[0], -1), idx, axis=0, mode='clip')
  return rows.reshape(idx.shape + a.shape[1:])


class RowSums(NamedTuple):
  """Per-row accumulators of a pass: row r sums the weighted terms of the r-th example of every
  batch. Adding elementwise each step fuses with the producers (no per-step reductions); the
  rows are summed once at the end of the pass."""
  loss: jax.Array  # (B,)
  correct: jax.Array  # (B,)
  abs_sum: tuple[jax.Array, ...]  # (B, units) per layer
  zero_sum: tuple[jax.Array, ...]

  @classmethod
  def zeros(cls, rows: int, masks: Masks) -> 'RowSums':
    z = lambda: tuple(jnp.zeros((rows, m.shape[-1]), jnp.float32) for m in masks)
    return cls(jnp.zeros((rows,), jnp.float32), jnp.zeros((rows,), jnp.float32), z(), z())

  def add(self, w, ce, logits, labels, stats) -> 'RowSums':
    correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    wc = w[:, None]
    return RowSums(self.loss + w * ce, self.correct + w * correct,
                    tuple(a + wc * s.abs_mean for a, s in zip(self.abs_sum, stats)),
                    tuple(z + wc * s.zero_frac for z, s in zip(self.zero_sum, stats)))

  def totals(self):
    """(loss sum, correct sum, per-unit abs sums, per-unit zero sums)."""
    return (self.loss.sum(), self.correct.sum(), tuple(a.sum(0) for a in self.abs_sum),
            tuple(z.sum(0) for z in self.zero_sum))
