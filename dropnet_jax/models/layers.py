"""What every masked model is built from: masks, per-unit statistics and the masked activation.

A node/filter *mask* is a tuple with one float32 vector per masked layer (1
kept, 0 dropped), given to `apply` as an input, never held as module state.
Models return, per masked layer, the per-example post-activation statistics
that scoring needs (`UnitStats`), so no second "activation model" is built;
a pass over data sums them per unit into `StatSums`.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Masks = tuple[jax.Array, ...]

# Keras' defaults (the paper's code is Keras): Glorot-uniform kernels, zero
# biases. Flax's default is LeCun-normal; using Keras' keeps the dense accuracy
# and the pruning curves comparable with the paper.
KERNEL_INIT = nn.initializers.glorot_uniform()


class UnitStats(NamedTuple):
  """Per-example, per-unit post-activation statistics of one masked layer."""
  abs_mean: jax.Array  # (batch, units): mean |a| (conv filters: over spatial positions)
  zero_frac: jax.Array  # (batch, units): fraction of exact zeros (APoZ)


class StatSums(NamedTuple):
  """Per-unit sums of post-activation statistics over a set of examples."""
  abs_sum: tuple[jax.Array, ...]  # sum over examples of mean |a|, per layer (units,)
  zero_sum: tuple[jax.Array, ...]  # sum over examples of the fraction of zeros
  count: jax.Array  # number of examples summed (scalar)


def zero_sums(masks: Masks) -> StatSums:
  return StatSums(tuple(jnp.zeros_like(m) for m in masks), tuple(jnp.zeros_like(m) for m in masks),
                  jnp.zeros((), jnp.float32))


def unit_stats(a: jax.Array) -> UnitStats:
  """The statistics of a masked layer's output `a` (batch, [H, W,] units)."""
  spatial_axes = tuple(range(1, a.ndim - 1))  # () for dense, (1, 2) for conv
  abs_a = jnp.abs(a)
  zero = (a == 0).astype(a.dtype)
  if spatial_axes:
    abs_a = abs_a.mean(axis=spatial_axes)
    zero = zero.mean(axis=spatial_axes)
  return UnitStats(abs_a, zero)


def masked_relu(x: jax.Array, mask: jax.Array) -> tuple[jax.Array, UnitStats]:
  """ReLU, then the unit mask; returns the activations and their statistics.

  The mask multiplies the post-activation, as in the paper: a dropped unit
  outputs exactly 0, so nothing downstream sees it and its incoming weights get
  zero gradient.
  """
  a = nn.relu(x) * mask.astype(x.dtype)
  return a, unit_stats(a)


def masked_linear(x: jax.Array, mask: jax.Array) -> tuple[jax.Array, UnitStats]:
  """The mask on an output with no activation (ResNet's projection shortcut), with the same stats."""
  a = x * mask.astype(x.dtype)
  return a, unit_stats(a)


# Per-channel input normalisation: ((mean per channel), (std per channel)) of [0, 1]-scaled pixels,
# or None. A model field, so a saved or compacted network carries it and normalises wherever it runs.
InputNorm = tuple[tuple[float, ...], tuple[float, ...]] | None


def to_float(images: jax.Array, input_norm: InputNorm = None) -> jax.Array:
  """uint8 pixels -> float32 in [0, 1] (float input is taken as already scaled), then, with
  `input_norm = (mean, std)`, (x - mean) / std per channel (torchvision's `Normalize` after `ToTensor`)."""
  if jnp.issubdtype(images.dtype, jnp.integer):
    x = images.astype(jnp.float32) / 255.0
  else:
    x = images.astype(jnp.float32)
  if input_norm is not None:
    mean, std = (jnp.asarray(v, jnp.float32) for v in input_norm)
    if mean.shape != (x.shape[-1],) or std.shape != (x.shape[-1],):
      raise ValueError(f'input_norm has {mean.shape[0]} means and {std.shape[0]} stds for {x.shape[-1]} channels')
    x = (x - mean) / std
  return x


def dropout(x: jax.Array, rate: float, train: bool, name: str | None = None) -> jax.Array:
  """Inverted dropout in training only (call inside a compact module). The trainer gives the
  'dropout' PRNG stream a key per (seed, cycle, epoch, step), so a resumed run drops the same units;
  rate 0 adds nothing to the program."""
  if not rate:
    return x
  return nn.Dropout(rate, deterministic=not train, name=name)(x)


def check_dropout(rate: float) -> None:
  if not 0.0 <= rate < 1.0:
    raise ValueError(f'dropout rate must be in [0, 1), got {rate}')


def full_masks(model: nn.Module) -> Masks:
  """The dense starting mask: one all-ones float32 vector per masked layer (`model.widths`)."""
  return tuple(jnp.ones((w,), jnp.float32) for w in model.widths)


def gather_channels(x: jax.Array, index: Sequence[int]) -> jax.Array:
  """x[..., index] with -1 meaning an all-zero channel; the identity map is returned as is (the
  gathered residual add of compact ResNets)."""
  index = tuple(int(i) for i in index)
  if index == tuple(range(x.shape[-1])):
    return x
  padded = jnp.concatenate([x, jnp.zeros((*x.shape[:-1], 1), x.dtype)], axis=-1)
  where = np.array([i if i >= 0 else x.shape[-1] for i in index], np.int32)
  return jnp.take(padded, where, axis=-1)


class BatchNorm(nn.Module):
  """Batch norm with PyTorch's (and Keras' fused) running statistics: training normalises with the
  batch's biased variance and folds the *unbiased* one, n/(n-1) times it, into the running variance
  (Flax's `nn.BatchNorm` folds the biased one). Same parameter and statistic names as Flax's ('scale',
  'bias'; 'mean', 'var' in 'batch_stats'), so θ, compaction and the PyTorch twin read it unchanged.
  `momentum` is Flax's convention: running = momentum · running + (1 - momentum) · batch (torch's 0.1 is
  0.9 here)."""
  use_running_average: bool = False
  momentum: float = 0.9
  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones_init(), (c,))
    bias = self.param('bias', nn.initializers.zeros_init(), (c,))
    running_mean = self.variable('batch_stats', 'mean', lambda: jnp.zeros((c,), jnp.float32))
    running_var = self.variable('batch_stats', 'var', lambda: jnp.ones((c,), jnp.float32))
    if self.use_running_average:
      mean, var = running_mean.value, running_var.value
    else:
      axes = tuple(range(x.ndim - 1))
      mean = x.mean(axis=axes)
      var = jnp.square(x - mean).mean(axis=axes)  # two-pass, as torch
      n = x.size // c
      if not self.is_initializing():
        unbiased = var * (n / (n - 1) if n > 1 else 1.0)
        running_mean.value = self.momentum * running_mean.value + (1 - self.momentum) * mean
        running_var.value = self.momentum * running_var.value + (1 - self.momentum) * unbiased
    return (x - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias
