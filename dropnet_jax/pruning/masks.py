"""Counting and encoding node/filter masks (tuples of 0/1 float vectors, one per masked layer)."""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from dropnet_jax.models.layers import Masks


def num_to_drop(fraction, remaining):
  """floor(fraction * remaining) for the decimal fraction, computed in float32.

  Products that are exact integers in decimal (0.7 * 90 = 63) can come out
  just below in binary floating point (62.99999999999999, so Python's int()
  gives 62); the relative nudge gives the decimal answer for every fraction
  with a few decimal digits (tested on a grid against exact rationals).
  """
  remaining = jnp.asarray(remaining, jnp.float32)
  return jnp.floor(jnp.asarray(fraction, jnp.float32) * remaining * (1 + 1e-6)).astype(jnp.int32)


def drop_count(mask: jax.Array, fraction) -> jax.Array:
  """How many of `mask`'s kept units a cycle drops: max(floor(fraction * kept), 1), but never the
  last one (kept - 1 at most), so the cycle count is finite and the network keeps a path."""
  remaining = mask.sum()
  n = jnp.maximum(num_to_drop(fraction, remaining), 1)
  return jnp.maximum(jnp.minimum(n, remaining.astype(jnp.int32) - 1), 0)


def units_per_layer(masks: Masks) -> list[int]:
  return [int(round(float(m.sum()))) for m in masks]


def fraction_remaining(masks: Masks) -> float:
  total = sum(m.size for m in masks)
  return sum(units_per_layer(masks)) / total


def mask_to_strings(masks: Masks) -> list[str]:
  """The record form of a mask: one '0'/'1' string per layer."""
  return [''.join('1' if v > 0 else '0' for v in jax.device_get(m)) for m in masks]


def masks_from_strings(bits: Sequence[str]) -> Masks:
  return tuple(jnp.array([c == '1' for c in b], jnp.float32) for b in bits)
