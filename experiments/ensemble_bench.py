r"""Speed of the vectorised team scoring against the straightforward float64 reference.

  python -m experiments.ensemble_bench --members=20 --max_size=5 --samples=2000

Random validation predictions of M members (each right with its own
probability in [0.5, 0.9], otherwise a uniform random label) are scored both
ways: every team of sizes 2..S (C(20,2) + ... + C(20,5) = 21,679 teams), the
four diversity measures (CK, BD, KW, GD) focal on each member's negatives and
on the whole set.

  * vectorised: `ensemble.score_teams`, one jitted program; compilation is
    timed separately (`.lower().compile()`), then the best of --repeats runs;
  * reference: `ensemble.reference.focal_scores` (NumPy/itertools, float64,
    one team x focal member at a time), timed once.

It prints both times, their ratio, the compile time, and the largest difference
between the two results. --hq also times HQ pruning (one diversity measure,
BD, at --beta) both ways. --out (optional) is a directory: the settings
(config.json) and the figures (figures.json) are written there.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from dropnet_jax import ensemble
from dropnet_jax.cli import entry
from dropnet_jax.ensemble import reference
from dropnet_jax.ensemble.diversity import MAX_SAMPLES
from dropnet_jax.ensemble.pipeline import MAX_TEAMS
from dropnet_jax.ensemble.pools import team_count
from dropnet_jax.settings import setting


@dataclasses.dataclass(frozen=True)
class BenchConfig:
  """The random pool and what is timed."""
  members: int = setting(20, 'M: pool size.', flag='members')
  max_size: int = setting(5, 'S: largest team size (teams of sizes 2..S).', flag='max_size')
  samples: int = setting(2000, 'N: validation samples.', flag='samples')
  classes: int = setting(10, 'Number of classes.', flag='classes')
  repeats: int = setting(5, 'Timed runs of the vectorised program (best reported).', flag='repeats')
  seed: int = setting(0, 'Seed of the random predictions.', flag='seed')
  reference: bool = setting(True, 'Time the float64 reference too.', flag='reference')
  hq: bool = setting(True, 'Also time HQ pruning (vectorised vs reference).', flag='hq')
  beta: float = setting(0.1, 'HQ beta for --hq.', flag='beta')

  def validate(self) -> None:
    if self.members < 2:
      raise ValueError(f'--members must be >= 2, got {self.members}')
    if not 2 <= self.max_size <= self.members:
      raise ValueError(f'--max_size must be in [2, --members={self.members}], got {self.max_size}')
    if not 1 <= self.samples <= MAX_SAMPLES:
      raise ValueError(f'--samples must be in [1, {MAX_SAMPLES}], got {self.samples}')
    if self.classes < 2:
      raise ValueError(f'--classes must be >= 2, got {self.classes}')
    if self.repeats < 1:
      raise ValueError(f'--repeats must be >= 1, got {self.repeats}')
    if self.seed < 0:
      raise ValueError(f'--seed must be >= 0, got {self.seed}')
    if not (math.isfinite(self.beta) and 0 <= self.beta <= 1):
      raise ValueError(f'--beta must be in [0, 1], got {self.beta}')
    teams = team_count(self.members, self.max_size)
    if teams > MAX_TEAMS:
      raise ValueError(f'--members={self.members} with --max_size={self.max_size} give {teams:,} teams (at most '
                       f'{MAX_TEAMS:,}); lower one of them')


CONFIG = entry.define(BenchConfig(), 'ensemble_bench', out_required=False,
                      out_help='Optional output directory: config.json and figures.json.')


def random_predictions(members: int, samples: int, classes: int, seed: int):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, classes, samples)
  skill = rng.uniform(0.5, 0.9, members)
  right = rng.random((members, samples)) < skill[:, None]
  return np.where(right, labels, rng.integers(0, classes, (members, samples))), labels


def main(argv):
  from dropnet_jax.runs.run_dir import RunDir  # here: --help does not need it
  del argv
  config = entry.config(CONFIG)
  out = entry.FLAGS.out
  run_dir = None
  if out:
    try:
      if out.endswith('.json'):
        raise ValueError(f'--out={out}: --out is a directory now (figures.json is written in it)')
      run_dir = RunDir(out, 'ensemble_bench', config)
      run_dir.check()
    except ValueError as e:
      entry.fail(e)

  m, s, n, c = config.members, config.max_size, config.samples, config.classes
  preds, labels = random_predictions(m, n, c, config.seed)
  sizes = tuple(range(2, s + 1))
  teams = tuple(ensemble.enumerate_teams(m, k) for k in sizes)
  correct = preds == labels
  args = (jnp.asarray(preds), jnp.asarray(labels), jnp.asarray(ensemble.negative_weights(correct)),
          jnp.asarray(correct.mean(1), jnp.float32), tuple(jnp.asarray(t) for t in teams))
  figures = {'members': m, 'max_size': s, 'samples': n, 'classes': c,
             'teams': int(sum(len(t) for t in teams)), 'backend': jax.default_backend(),
             'device': str(jax.devices()[0])}
  print(f'M={m} S={s} N={n} C={c}: {figures["teams"]:,} teams '
        f'({" + ".join(str(math.comb(m, k)) for k in sizes)}), backend {figures["backend"]}')

  start = time.perf_counter()
  compiled = ensemble.score_teams.lower(*args, num_classes=c).compile()
  figures['compile_s'] = time.perf_counter() - start
  runs = []
  for _ in range(config.repeats):
    start = time.perf_counter()
    scores = jax.block_until_ready(compiled(*args))
    runs.append(time.perf_counter() - start)
  figures['vectorised_s'] = min(runs)
  print(f'vectorised (jitted, vmapped): {figures["vectorised_s"]:.4f} s (best of {config.repeats}; '
        f'compile {figures["compile_s"]:.2f} s, separately)')

  if config.reference:
    start = time.perf_counter()
    ref_focal, ref_whole = reference.focal_scores(preds, labels, sizes)
    figures['reference_s'] = time.perf_counter() - start
    figures['ratio'] = figures['reference_s'] / figures['vectorised_s']
    diff = max(max(np.abs(f - np.array([ref_focal[tuple(t)] for t in ts])).max(),
                   np.abs(w - np.array([ref_whole[tuple(t)] for t in ts])).max())
               for ts, (f, w) in zip(teams, jax.device_get(scores)))
    figures['max_abs_difference'] = float(diff)
    print(f'reference (NumPy/itertools, float64): {figures["reference_s"]:.2f} s')
    print(f'ratio reference / vectorised: {figures["ratio"]:.0f}x; '
          f'largest |difference| of the scores: {diff:.2e}')

  if config.hq:
    bd = ensemble.DIVERSITIES.index('BD')
    focal = [np.asarray(f[:, bd]) for f, _ in jax.device_get(scores)]
    acc = [np.zeros(len(t)) for t in teams]
    start = time.perf_counter()
    ours = ensemble.hq_prune(teams, focal, acc, config.beta, m)
    figures['hq_vectorised_s'] = time.perf_counter() - start
    print(f'HQ (beta={config.beta}, BD): vectorised {figures["hq_vectorised_s"]:.3f} s', end='')
    if config.reference:
      as_dict = lambda values: {tuple(t): v for ts, vs in zip(teams, values) for t, v in zip(ts, vs)}
      start = time.perf_counter()
      chosen, _, _ = reference.hq_prune(as_dict(focal), as_dict(acc), m, s, config.beta)
      figures['hq_reference_s'] = time.perf_counter() - start
      same = all((tuple(t[i]) if i >= 0 else None) == chosen[k] for t, i, k in zip(teams, ours.chosen, sizes))
      figures['hq_same_choices'] = same
      print(f', reference {figures["hq_reference_s"]:.2f} s '
            f'({figures["hq_reference_s"] / figures["hq_vectorised_s"]:.0f}x), same choices: {same}', end='')
    print()

  if run_dir is not None:
    with run_dir.open():
      run_dir.write_text('figures.json', json.dumps(figures, indent=2))


def run() -> None:
  entry.run(main)


if __name__ == '__main__':
  run()
