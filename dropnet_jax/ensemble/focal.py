"""Focal diversity of every candidate team, all sizes scored by one jitted program.

Focal diversity (Wu & Liu; EnsembleBench `groupMetrics.calFocalDiversityScores`
and HQ-Ensemble's script): for a focal member f and a team T containing f, the
diversity measure of T evaluated only on f's *negative* samples (those f gets
wrong). For each focal member and team size these values are min-max
normalised over the teams of that size containing f, and a team's focal score
is the accuracy-rank-weighted mean over its members of their normalised
values. Lower = more diverse, per diversity measure (see `diversity`).

Deliberate differences from the reference script, all deterministic:
  * Rank weights are true ranks: member k's weight is the 1-based rank of its
    accuracy within the team (the most accurate gets s; ties get the average
    rank). HQ-Ensemble uses `np.argsort(acc)[k]`, the index of the k-th
    smallest accuracy, which is a permutation of 0..s-1 but not member k's
    rank, and gives one member weight 0.
  * Accuracies (rank weights) and negative samples come from the validation
    predictions passed in; the reference ranks with test accuracy.
  * Negatives: all of them by default; with `max_negatives=K`, a focal member
    with more than K negatives uses K of them drawn without replacement by
    `np.random.default_rng(seed)` (members in order). The reference draws 3 x
    100 with replacement and averages.
  * A min-max range of 0 (all teams of that size tie for the focal member, e.g.
    size M) normalises to 0; the reference leaves the raw values. A member
    with no negatives (perfect on validation) has an empty sample set, every
    measure 1 on every team (see `diversity`), so it contributes 0 (nothing
    left to complement); the reference script skips it and then fails.
"""

from __future__ import annotations

import functools
import itertools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dropnet_jax.ensemble.diversity import pair_stats, team_diversity


def enumerate_teams(num_members: int, size: int) -> np.ndarray:
  """All C(M, size) teams as rows of member indices (int32), in itertools.combinations order."""
  if not 1 <= size <= num_members:
    raise ValueError(f'team size must be in [1, {num_members}], got {size}')
  flat = np.fromiter(itertools.chain.from_iterable(itertools.combinations(range(num_members), size)),
                     dtype=np.int32)
  return flat.reshape(-1, size)


def negative_weights(correct: np.ndarray, max_negatives: int | None = None,
                     seed: int = 0) -> np.ndarray:
  """(M, N) bool: row f marks member f's negative samples (optionally a seeded subsample)."""
  negatives = ~np.asarray(correct, bool)
  if max_negatives is None:
    return negatives
  rng = np.random.default_rng(seed)
  out = np.zeros_like(negatives)
  for f, row in enumerate(negatives):
    idx = np.flatnonzero(row)
    if len(idx) > max_negatives:
      idx = rng.choice(idx, max_negatives, replace=False)
    out[f, idx] = True
  return out


def rank_weights(accuracy: jax.Array) -> jax.Array:
  """1-based average ranks along the last axis (higher accuracy = larger weight; ties share)."""
  below = (accuracy[..., None, :] < accuracy[..., :, None]).sum(-1)
  equal = (accuracy[..., None, :] == accuracy[..., :, None]).sum(-1)
  return 1.0 + below + 0.5 * (equal - 1)


def _score_size(stats, teams: jax.Array, member_accuracy: jax.Array, num_members: int):
  """Focal (T, 4) and whole-set (T, 4) diversity of the teams (T, s) of one size."""
  per_focal = jax.vmap(lambda team: jax.vmap(lambda f: team_diversity(stats, team, f))(team))
  raw = per_focal(teams)  # (T, s, 4): row f of stats = f's negatives
  whole = jax.vmap(lambda team: team_diversity(stats, team, num_members))(teams)
  ids = teams.reshape(-1)
  flat = raw.reshape(-1, raw.shape[-1])
  lo = jax.ops.segment_min(flat, ids, num_segments=num_members)[teams]
  span = jax.ops.segment_max(flat, ids, num_segments=num_members)[teams] - lo
  norm = jnp.where(span > 0, (raw - lo) / jnp.where(span > 0, span, 1.0), 0.0)
  w = rank_weights(member_accuracy[teams])  # (T, s)
  # Terms sorted before summing so that equal multisets of (weight, score) give equal bits.
  focal = jnp.sort(w[..., None] * norm, axis=1).sum(1) / w.sum(1)[:, None]
  return focal, whole


@functools.partial(jax.jit, static_argnames=('num_classes',))
def score_teams(preds: jax.Array, labels: jax.Array, negatives: jax.Array,
                member_accuracy: jax.Array, teams: tuple[jax.Array, ...],
                num_classes: int) -> tuple[tuple[jax.Array, jax.Array], ...]:
  """Scores every team of every size in one program.

  Args:
    preds: (M, N) predicted labels of the members on the selection (validation) set.
    labels: (N,) true labels.
    negatives: (M, N) 0/1, row f = focal member f's negative samples used.
    member_accuracy: (M,) accuracies used for the rank weights.
    teams: one (T_s, s) int array per team size (s >= 2).
    num_classes: number of classes (static).

  Returns:
    Per size, (focal, whole): (T_s, 4) focal scores and (T_s, 4) diversity on all
    N samples, columns in `DIVERSITIES` order, lower = more diverse.
  """
  num_members = preds.shape[0]
  rows = jnp.concatenate([negatives.astype(jnp.int32),
                          jnp.ones((1, preds.shape[1]), jnp.int32)])
  stats = pair_stats(preds, labels, rows, num_classes)  # row M = all samples
  return tuple(_score_size(stats, t, member_accuracy, num_members) for t in teams)


class TeamScores(NamedTuple):
  """Every team of sizes 2..S with its scores; index i of each tuple is size sizes[i]."""
  sizes: tuple[int, ...]
  teams: tuple[np.ndarray, ...]  # (T_s, s) member indices
  focal: tuple[np.ndarray, ...]  # (T_s, 4) focal diversity
  whole: tuple[np.ndarray, ...]  # (T_s, 4) diversity on all selection samples


def focal_diversity(preds: np.ndarray, labels: np.ndarray, num_classes: int, max_size: int, *,
                    member_accuracy: np.ndarray | None = None, max_negatives: int | None = None,
                    seed: int = 0, sizes: Sequence[int] | None = None) -> TeamScores:
  """Enumerates the teams of sizes 2..max_size of M members and scores them all (host arrays out).

  `member_accuracy` defaults to the members' accuracy on `preds` itself.
  """
  preds = np.asarray(preds)
  labels = np.asarray(labels)
  num_members = preds.shape[0]
  if not 2 <= max_size <= num_members:
    raise ValueError(f'max_size must be in [2, {num_members}], got {max_size}')
  sizes = tuple(sizes or range(2, max_size + 1))
  correct = preds == labels[None, :]
  if member_accuracy is None:
    member_accuracy = correct.mean(1)
  teams = tuple(enumerate_teams(num_members, s) for s in sizes)
  negatives = negative_weights(correct, max_negatives, seed)
  out = score_teams(jnp.asarray(preds), jnp.asarray(labels), jnp.asarray(negatives),
                    jnp.asarray(member_accuracy, jnp.float32), tuple(jnp.asarray(t) for t in teams),
                    num_classes)
  out = jax.device_get(out)
  return TeamScores(sizes, teams, tuple(np.asarray(f) for f, _ in out),
                    tuple(np.asarray(w) for _, w in out))
