"""Straightforward float64 NumPy / itertools implementation of the ensemble definitions.

The test oracle and the benchmark baseline for the vectorised package: every
diversity measure is computed from its textbook formula on the team's own prediction rows
(pairs by itertools, counts by comparisons, kappa from marginals), every team x
focal member is evaluated separately, normalisation and HQ use dicts and sets.
It shares no code with the JAX implementation, so agreement checks the count
algebra there. Degenerate values follow the same documented conventions (see
`diversity`).
"""

from __future__ import annotations

import itertools
import math
from typing import Sequence

import numpy as np
from scipy import stats as scipy_stats

Team = tuple[int, ...]


def cohen_kappa(a: np.ndarray, b: np.ndarray) -> float:
  """Cohen's kappa of two label vectors; 1 when p_e = 1 (both constant, same class)."""
  po = np.mean(a == b)
  classes = np.union1d(a, b)
  pe = sum(np.mean(a == c) * np.mean(b == c) for c in classes)
  if pe == 1.0:
    return 1.0
  return float((po - pe) / (1.0 - pe))


def diversity(preds: np.ndarray, labels: np.ndarray) -> np.ndarray:
  """[CK, 1 - BD, 1 - KW, 1 - GD] of a team's labels `preds` (L, n); all 1 when n = 0."""
  preds = np.asarray(preds)
  labels = np.asarray(labels)
  members, n = preds.shape
  if n == 0:
    return np.ones(4)
  pairs = list(itertools.combinations(range(members), 2))
  ck = np.mean([cohen_kappa(preds[i], preds[k]) for i, k in pairs])
  right = preds == labels[None, :]
  # BD, KW and GD are ratios of integer counts; each is formed with one division so
  # that equal true values are equal floats (HQ's tie-breaks depend on exact ties).
  disagree = 0
  for i, k in pairs:
    n01 = np.sum(~right[i] & right[k])
    n10 = np.sum(right[i] & ~right[k])
    disagree += n01 + n10
  bd = disagree / (len(pairs) * n)  # mean over pairs of (N01 + N10) / N
  l = right.sum(0)
  kw = np.sum(l * (members - l)) / (n * members * members)
  failures = members - l
  count = np.bincount(failures, minlength=members + 1)  # count[i]: samples with i failures
  i = np.arange(members + 1)
  # P1 = sum_i i pi_i / L, P2 = sum_i i (i-1) pi_i / (L (L-1)), pi_i = count_i / n.
  p1_num = np.sum(i * count)
  p2_num = np.sum(i * (i - 1) * count)
  gd = 1.0 - (p2_num * members) / (p1_num * members * (members - 1)) if p1_num > 0 else 0.0
  return np.array([ck, 1.0 - bd, 1.0 - kw, 1.0 - gd], np.float64)


def focal_scores(preds: np.ndarray, labels: np.ndarray, sizes: Sequence[int],
                 negatives: np.ndarray | None = None,
                 member_accuracy: np.ndarray | None = None) -> tuple[dict[Team, np.ndarray], dict[Team, np.ndarray]]:
  """Focal scores and whole-set diversity of every team, as {team: (4,) array}."""
  preds = np.asarray(preds)
  labels = np.asarray(labels)
  members = preds.shape[0]
  right = preds == labels[None, :]
  if negatives is None:
    negatives = ~right
  if member_accuracy is None:
    member_accuracy = right.mean(1)
  raw: dict[tuple[Team, int], np.ndarray] = {}
  for s in sizes:
    for team in itertools.combinations(range(members), s):
      for f in team:
        idx = np.flatnonzero(negatives[f])
        raw[(team, f)] = diversity(preds[list(team)][:, idx], labels[idx])
  focal, whole = {}, {}
  for s in sizes:
    teams = list(itertools.combinations(range(members), s))
    lo, hi = {}, {}
    for f in range(members):
      values = np.array([raw[(t, f)] for t in teams if f in t])
      lo[f], hi[f] = values.min(0), values.max(0)
    for team in teams:
      norm = []
      for f in team:
        span = hi[f] - lo[f]
        norm.append(np.where(span > 0, (raw[(team, f)] - lo[f]) / np.where(span > 0, span, 1), 0.0))
      weights = scipy_stats.rankdata([member_accuracy[f] for f in team])  # average ranks, 1-based
      # Snapped to 1e-12: float64 summation noise (~1e-16) must not split true ties.
      focal[team] = np.round(np.average(np.array(norm), axis=0, weights=weights), 12)
      whole[team] = diversity(preds[list(team)], labels)
  return focal, whole


def hq_prune(scores: dict[Team, float], accuracy: dict[Team, float], members: int,
             max_size: int, beta: float) -> tuple[dict[int, Team | None], Team | None, dict[int, set[Team]]]:
  """HQ with explicit subset checks: (chosen team per size, overall choice, survivors per size)."""
  pruned: list[Team] = []
  chosen: dict[int, Team | None] = {}
  survivors: dict[int, set[Team]] = {}
  for s in range(2, max_size + 1):
    candidates = [t for t in itertools.combinations(range(members), s)
                  if not any(set(p).issubset(t) for p in pruned)]
    candidates.sort(key=lambda t: (-scores[t], accuracy[t], t))
    k = int(math.floor(len(candidates) * beta + 1e-9))
    pruned.extend(candidates[:k])
    kept = candidates[k:]
    survivors[s] = set(kept)
    chosen[s] = min(kept, key=lambda t: (scores[t], -accuracy[t], t)) if kept else None
  picks = [t for t in chosen.values() if t is not None]
  best = max(picks, key=lambda t: (accuracy[t], -len(t))) if picks else None
  return chosen, best, survivors


def team_accuracy(probs: np.ndarray, labels: np.ndarray, team: Team) -> tuple[float, float]:
  """(plurality, soft) accuracy of `team`, sample by sample."""
  p = np.asarray(probs, np.float64)[list(team)]
  labels = np.asarray(labels)
  plural, soft = [], []
  for j in range(p.shape[1]):
    mean = p[:, j].mean(0)
    soft.append(int(np.argmax(mean)))
    votes = np.bincount(np.argmax(p[:, j], axis=1), minlength=p.shape[2])
    tied = np.flatnonzero(votes == votes.max())
    plural.append(int(tied[np.argmax(mean[tied])]))
  return float(np.mean(np.array(plural) == labels)), float(np.mean(np.array(soft) == labels))
