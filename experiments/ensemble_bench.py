r"""Speed of the vectorised team scoring against the straightforward float64 reference.

  python -m experiments.ensemble_bench --members=20 --max_size=5 --samples=2000

Random validation predictions of M members (each right with its own
probability in [0.5, 0.9], otherwise a uniform random label) are scored both
ways: every team of sizes 2..S (C(20,2) + ... + C(20,5) = 21,679 teams), all
four focal metrics on each member's negatives and the four whole-set metrics.

  * vectorised: `ensemble.score_teams`, one jitted program; compilation is
    timed separately (`.lower().compile()`), then the best of --repeats runs;
  * reference: `ensemble.reference.focal_scores` (NumPy/itertools, float64,
    one team x focal member at a time), timed once.

It prints both times, their ratio, the compile time, and the largest difference
between the two results. --hq also times HQ pruning (one metric, --beta) both
ways. --out writes the figures as JSON.
"""

from __future__ import annotations

import json
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from dropnet_jax import ensemble
from dropnet_jax.ensemble import reference

FLAGS = flags.FLAGS
flags.DEFINE_integer('members', 20, 'M: pool size.')
flags.DEFINE_integer('max_size', 5, 'S: largest team size (teams of sizes 2..S).')
flags.DEFINE_integer('samples', 2000, 'N: validation samples.')
flags.DEFINE_integer('classes', 10, 'Number of classes.')
flags.DEFINE_integer('repeats', 5, 'Timed runs of the vectorised program (best reported).')
flags.DEFINE_integer('seed', 0, 'Seed of the random predictions.')
flags.DEFINE_bool('reference', True, 'Time the float64 reference too.')
flags.DEFINE_bool('hq', True, 'Also time HQ pruning (vectorised vs reference).')
flags.DEFINE_float('beta', 0.1, 'HQ beta for --hq.')
flags.DEFINE_string('out', None, 'Optional JSON file for the figures.')


def random_predictions(members: int, samples: int, classes: int, seed: int):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, classes, samples)
  skill = rng.uniform(0.5, 0.9, members)
  right = rng.random((members, samples)) < skill[:, None]
  return np.where(right, labels, rng.integers(0, classes, (members, samples))), labels


def main(argv):
  del argv
  m, s, n, c = FLAGS.members, FLAGS.max_size, FLAGS.samples, FLAGS.classes
  preds, labels = random_predictions(m, n, c, FLAGS.seed)
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
  for _ in range(FLAGS.repeats):
    start = time.perf_counter()
    out = jax.block_until_ready(compiled(*args))
    runs.append(time.perf_counter() - start)
  figures['vectorised_s'] = min(runs)
  print(f'vectorised (jitted, vmapped): {figures["vectorised_s"]:.4f} s (best of {FLAGS.repeats}; '
        f'compile {figures["compile_s"]:.2f} s, separately)')

  if FLAGS.reference:
    start = time.perf_counter()
    ref_focal, ref_whole = reference.focal_scores(preds, labels, sizes)
    figures['reference_s'] = time.perf_counter() - start
    figures['ratio'] = figures['reference_s'] / figures['vectorised_s']
    diff = max(max(np.abs(f - np.array([ref_focal[tuple(t)] for t in ts])).max(),
                   np.abs(w - np.array([ref_whole[tuple(t)] for t in ts])).max())
               for ts, (f, w) in zip(teams, jax.device_get(out)))
    figures['max_abs_difference'] = float(diff)
    print(f'reference (NumPy/itertools, float64): {figures["reference_s"]:.2f} s')
    print(f'ratio reference / vectorised: {figures["ratio"]:.0f}x; '
          f'largest |difference| of the scores: {diff:.2e}')

  if FLAGS.hq:
    focal = [np.asarray(f[:, 1]) for f, _ in jax.device_get(out)]  # BD
    acc = [np.zeros(len(t)) for t in teams]
    start = time.perf_counter()
    ours = ensemble.hq_prune(teams, focal, acc, FLAGS.beta, m)
    figures['hq_vectorised_s'] = time.perf_counter() - start
    print(f'HQ (beta={FLAGS.beta}, BD): vectorised {figures["hq_vectorised_s"]:.3f} s', end='')
    if FLAGS.reference:
      as_dict = lambda values: {tuple(t): v for ts, vs in zip(teams, values) for t, v in zip(ts, vs)}
      start = time.perf_counter()
      chosen, _, _ = reference.hq_prune(as_dict(focal), as_dict(acc), m, s, FLAGS.beta)
      figures['hq_reference_s'] = time.perf_counter() - start
      same = all((tuple(t[i]) if i >= 0 else None) == chosen[k] for t, i, k in zip(teams, ours.chosen, sizes))
      figures['hq_same_choices'] = same
      print(f', reference {figures["hq_reference_s"]:.2f} s '
            f'({figures["hq_reference_s"] / figures["hq_vectorised_s"]:.0f}x), same choices: {same}', end='')
    print()

  if FLAGS.out:
    with open(FLAGS.out, 'w') as f:
      json.dump(figures, f, indent=2)


if __name__ == '__main__':
  app.run(main)
