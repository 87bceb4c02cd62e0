"""HQ hierarchical ensemble pruning (Wu & Liu, ICDM 2021) on precomputed focal scores.

For team sizes s = 2..S in turn: teams containing any team pruned at a smaller
size are discarded; the remaining candidates are ranked by focal score and the
worst fraction beta (floor(beta * candidates), the *least* diverse, i.e.
highest scores) is pruned; the rest survive. Following HQ-Ensemble's script,
ties in focal score prune the lower-accuracy team first (then the earlier
team in itertools order).

Per size we choose the surviving team with the lowest focal score (ties: higher
selection accuracy, then the earlier team); overall, the per-size choice with
the highest selection accuracy (ties: the smaller team). All accuracies here are
*validation* accuracies; the reference script uses test accuracy, we keep test
data out of every decision.

The containment test is vectorised by induction instead of comparing every
team with every pruned team: a size-s team contains a pruned team iff one of
its (s-1)-subsets is pruned or was itself discarded. Subsets are located by
their combinatorial (colex) rank, so one size costs O(T_s * s).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class HQResult:
  """Outcome of HQ for one diversity measure and beta; indices refer to rows of `teams[i]` of size `sizes[i]`."""
  sizes: tuple[int, ...]
  beta: float
  survivors: tuple[np.ndarray, ...]  # team indices that survive at each size
  pruned: tuple[np.ndarray, ...]  # team indices pruned at each size
  chosen: tuple[int, ...]  # per size the chosen team index, -1 if none survives
  best_size: int  # size of the overall choice (0 if none)
  best_index: int  # its team index (-1 if none)


def prune_count(candidates: int, beta: float) -> int:
  """floor(beta * candidates), robust to float products such as 0.29 * 100 = 28.999..."""
  return int(math.floor(candidates * beta + 1e-9))


def _binomials(n: int, k: int) -> np.ndarray:
  table = np.zeros((n + 1, k + 1), np.int64)
  for i in range(n + 1):
    for j in range(min(i, k) + 1):
      table[i, j] = math.comb(i, j)
  return table


def _colex_rank(teams: np.ndarray, binom: np.ndarray) -> np.ndarray:
  """sum_i C(c_i, i + 1) of each sorted row: a bijection from r-subsets to 0..C(M, r)-1."""
  cols = np.arange(teams.shape[1])
  return binom[teams, cols + 1].sum(axis=1)


def hq_prune(teams: Sequence[np.ndarray], scores: Sequence[np.ndarray],
             accuracy: Sequence[np.ndarray], beta: float,
             num_members: int | None = None) -> HQResult:
  """Runs HQ over consecutive sizes.

  Args:
    teams: per size, (T_s, s) teams of *all* s-subsets in itertools.combinations
      order (`focal.enumerate_teams`), sizes consecutive from 2.
    scores: per size, (T_s,) focal scores of one diversity measure (lower = more diverse).
    accuracy: per size, (T_s,) selection (validation) accuracy, for ties and the overall pick.
    beta: fraction of candidates pruned per size, in [0, 1].
    num_members: M (default: 1 + the largest member index).
  """
  if not 0.0 <= beta <= 1.0:
    raise ValueError(f'beta must be in [0, 1], got {beta}')
  sizes = tuple(int(t.shape[1]) for t in teams)
  if sizes and (sizes[0] != 2 or sizes != tuple(range(2, 2 + len(sizes)))):
    raise ValueError(f'team sizes must run consecutively from 2, got {sizes}')
  if num_members is None:
    num_members = int(max(t.max() for t in teams)) + 1
  binom = _binomials(num_members, max(sizes, default=1))
  dead_prev = None  # previous size: pruned or discarded
  lex_of_colex_prev = None
  survivors, pruned, chosen = [], [], []
  for team, score, acc in zip(teams, scores, accuracy):
    team, score, acc = np.asarray(team), np.asarray(score), np.asarray(acc)
    count, s = team.shape
    if count != math.comb(num_members, s):
      raise ValueError(f'size {s}: expected all {math.comb(num_members, s)} teams, got {count}')
    candidate = np.ones(count, bool)
    if dead_prev is not None:
      for drop in range(s):
        sub = np.delete(team, drop, axis=1)
        candidate &= ~dead_prev[lex_of_colex_prev[_colex_rank(sub, binom)]]
    idx = np.flatnonzero(candidate)
    # Prune order: highest score first, then lower accuracy, then earlier team.
    order = idx[np.lexsort((idx, acc[idx], -score[idx]))]
    k = prune_count(len(idx), beta)
    pruned.append(np.sort(order[:k]))
    kept = np.sort(order[k:])
    survivors.append(kept)
    if len(kept):
      best = kept[np.lexsort((kept, -acc[kept], score[kept]))[0]]
      chosen.append(int(best))
    else:
      chosen.append(-1)
    dead_prev = ~candidate
    dead_prev[order[:k]] = True
    lex_of_colex_prev = np.empty(count, np.int64)
    lex_of_colex_prev[_colex_rank(team, binom)] = np.arange(count)
  best_size, best_index, best_acc = 0, -1, -np.inf
  for s, c, acc in zip(sizes, chosen, accuracy):
    if c >= 0 and acc[c] > best_acc:  # strict: ties keep the smaller team
      best_size, best_index, best_acc = s, c, acc[c]
  return HQResult(sizes, float(beta), tuple(survivors), tuple(pruned), tuple(chosen),
                  best_size, best_index)
