"""Ensemble diversity measures (CK, BD, KW, GD), computed from pairwise count statistics.

The four diversity measures of EnsembleBench (git-disl/EnsembleBench, `diversityMetrics.py`
and `groupMetrics.calDiversityMetric`), in its orientation: after its `1 - x`
transforms a *lower* value means a *more diverse* team. For a team of L
members on N samples (predicted labels p_ij, correctness c_ij = [p_ij == y_j]):

  * CK: Cohen's kappa of the predicted labels, averaged over the L(L-1)/2
    pairs (kappa = (p_o - p_e) / (1 - p_e)); not transformed.
  * BD: 1 - mean over pairs of (N01 + N10) / N, the binary disagreement of
    the correctness vectors.
  * KW: 1 - sum_j l_j (L - l_j) / (N L^2), l_j = members right on sample j
    (Kohavi-Wolpert variance).
  * GD: 1 - GD_Partridge = P2 / P1 with m_j = L - l_j members wrong on j,
    P1 = sum_j m_j / (N L), P2 = sum_j m_j (m_j - 1) / (N L (L - 1)).

Why statistics instead of the formulas: every measure above is a function of
integer counts over *pairs* of members on one set of samples -- n, the
per-member correct count A_i, the both-correct count G_ik (sum_j l_j^2 =
sum_ik G_ik), the agreement count and the chance-agreement count of kappa. They
are computed once per sample set (`pair_stats`, one einsum each) and a team's
diversity is then gathered from (M, M) tables (`team_diversity`), independent of N,
so all C(M, s) teams are scored by one vmapped gather program. Counts are
int32, so the ratios are exact up to one float32 division.

Defined values where the formulas are 0/0 (tested):
  * kappa with p_e = 1 (both members always predict the same single class,
    hence p_o = 1): 1, identical raters (sklearn returns nan);
  * an empty sample set (n = 0, e.g. a focal model with no errors): every
    measure is 1, "no observed diversity";
  * GD with no failure at all (P1 = 0): 1 (GD_Partridge = 0).
  * N <= L is not special here; EnsembleBench's GD indexes its histogram of
    failure counts by sample and so fails or truncates when N <= L, whereas we
    evaluate the formula itself.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

DIVERSITIES = ('CK', 'BD', 'KW', 'GD')  # the diversity measures, in the column order of every score array

# n * agreement and n^2 - chance are int32: n^2 must stay below 2^31.
MAX_SAMPLES = 46340


class PairStats(NamedTuple):
  """Pairwise counts of M members over R sample sets (weight rows)."""
  n: jax.Array  # (R,) samples in each set
  correct: jax.Array  # (R, M) samples member i gets right
  both: jax.Array  # (R, M, M) samples members i and k both get right (diagonal = correct)
  kappa: jax.Array  # (R, M, M) float32 Cohen's kappa of members i and k's labels


def pair_stats(preds: jax.Array, labels: jax.Array, weights: jax.Array,
               num_classes: int) -> PairStats:
  """Counts of `preds` (M, N) int labels against `labels` (N,) on each 0/1 row of `weights` (R, N)."""
  if preds.shape[-1] > MAX_SAMPLES:
    raise ValueError(f'at most {MAX_SAMPLES} samples (int32 counts), got {preds.shape[-1]}')
  preds = preds.astype(jnp.int32)
  w = weights.astype(jnp.int32)
  c = (preds == labels.astype(jnp.int32)[None, :]).astype(jnp.int32)  # (M, N)
  n = w.sum(axis=1)
  correct = w @ c.T
  both = jnp.einsum('rj,ikj->rik', w, c[:, None, :] * c[None, :, :])
  agree = jnp.einsum('rj,ikj->rik', w, (preds[:, None, :] == preds[None, :, :]).astype(jnp.int32))
  per_class = jnp.einsum('rj,ijc->ric', w, jax.nn.one_hot(preds, num_classes, dtype=jnp.int32))
  chance = jnp.einsum('ric,rkc->rik', per_class, per_class)  # n^2 * p_e
  n3 = n[:, None, None]
  numerator = n3 * agree - chance  # n^2 (p_o - p_e)
  denominator = n3 * n3 - chance  # n^2 (1 - p_e): 0 iff p_e = 1 (or n = 0)
  safe = jnp.where(denominator > 0, denominator, 1)
  kappa = jnp.where(denominator > 0,
                    numerator.astype(jnp.float32) / safe.astype(jnp.float32), 1.0)
  return PairStats(n, correct, both, kappa)


def team_diversity(stats: PairStats, team: jax.Array, row: jax.Array | int) -> jax.Array:
  """(4,) float32 [CK, BD, KW, GD] of the members `team` (s,) on sample set `row`; lower = more diverse.

  Jittable and vmappable over teams and rows; s = len(team) >= 2 is static.
  """
  s = team.shape[0]
  if s < 2:
    raise ValueError(f'a team needs at least 2 members, got {s}')
  n = stats.n[row]
  a = stats.correct[row][team]  # (s,)
  g = stats.both[row][team][:, team]  # (s, s)
  upper = np.triu_indices(s, 1)
  pairs = s * (s - 1) // 2
  # Sorted before summing: teams with the same multiset of pair kappas get bit-identical CK,
  # so true ties stay ties for HQ's tie-breaks.
  ck = jnp.sort(stats.kappa[row][team][:, team][upper]).sum() / pairs
  disagree = (a[:, None] + a[None, :] - 2 * g)[upper].sum()  # sum over pairs of N01 + N10
  sum_a, sum_g = a.sum(), g.sum()
  kw_num = s * sum_a - sum_g  # sum_j l_j (s - l_j)
  fail1 = s * n - sum_a  # sum_j m_j
  fail2 = s * s * n - 2 * s * sum_a + sum_g - fail1  # sum_j m_j (m_j - 1)
  f32 = jnp.float32
  nz = n > 0
  n_safe = jnp.where(nz, n, 1).astype(f32)
  bd = jnp.where(nz, 1.0 - disagree.astype(f32) / (pairs * n_safe), 1.0)
  kw = jnp.where(nz, 1.0 - kw_num.astype(f32) / (s * s * n_safe), 1.0)
  gd = jnp.where(fail1 > 0, fail2.astype(f32) / ((s - 1) * jnp.where(fail1 > 0, fail1, 1).astype(f32)), 1.0)
  return jnp.stack([ck.astype(f32), bd, kw, gd])


@functools.partial(jax.jit, static_argnames=('num_classes',))
def diversity(preds: jax.Array, labels: jax.Array, num_classes: int,
              weights: jax.Array | None = None) -> jax.Array:
  """[CK, BD, KW, GD] of a whole team: `preds` (L, N) labels, optional 0/1 sample `weights` (N,)."""
  if weights is None:
    weights = jnp.ones(preds.shape[1], jnp.int32)
  stats = pair_stats(preds, labels, weights[None, :], num_classes)
  return team_diversity(stats, jnp.arange(preds.shape[0]), 0)
