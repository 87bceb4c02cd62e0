"""Tests of dropnet_jax.ensemble: metrics by hand and vs float64, focal scores, HQ, voting, report."""

from __future__ import annotations

import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.metrics import cohen_kappa_score

from dropnet_jax import ensemble as E
from dropnet_jax import models
from dropnet_jax.ensemble import reference as R

# Tiny team worked by hand: 3 members, 6 samples, 3 classes.
HAND_LABELS = np.array([0, 1, 2, 0, 1, 2])
HAND_PREDS = np.array([[0, 1, 2, 0, 1, 0],    # right: 1 1 1 1 1 0
                       [0, 1, 1, 0, 2, 2],    # right: 1 1 0 1 0 1
                       [1, 1, 2, 2, 1, 1]])   # right: 0 1 1 0 1 0


def test_hand_computed_metrics():
  # CK: pair (0,1): p_o = 3/6, marginals (3,2,1)/6 and (2,2,2)/6, p_e = 12/36 -> kappa 1/4;
  # (0,2): p_o = 3/6, p2 marginals (0,4,2)/6, p_e = 10/36 -> (1/2 - 5/18)/(13/18) = 4/13;
  # (1,2): p_o = 1/6, p_e = 12/36 -> (1/6 - 1/3)/(2/3) = -1/4. Mean: 4/39.
  ck = (1 / 4 + 4 / 13 - 1 / 4) / 3
  # BD: correctness differs on 3, 2 and 5 of 6 samples: mean (1/2 + 1/3 + 5/6)/3 = 5/9.
  bd = 1 - 5 / 9
  # KW: l_j = 2,3,2,2,2,1 -> sum l(3-l) = 2+0+2+2+2+2 = 10 -> 10/(6*9).
  kw = 1 - 10 / 54
  # GD: failures m_j = 1,0,1,1,1,2: P1 = (4*1 + 1*2)/(6*3) = 1/3, P2 = (1*2*1)/(6*3*2) = 1/18.
  gd = (1 / 18) / (1 / 3)
  expected = np.array([ck, bd, kw, gd])
  np.testing.assert_allclose(E.diversity(HAND_PREDS, HAND_LABELS, 3), expected, rtol=1e-6)
  np.testing.assert_allclose(R.diversity(HAND_PREDS, HAND_LABELS), expected, rtol=1e-12)
  sk = np.mean([cohen_kappa_score(HAND_PREDS[i], HAND_PREDS[k]) for i, k in [(0, 1), (0, 2), (1, 2)]])
  assert sk == pytest.approx(ck)


def test_degenerate_cases_have_defined_values():
  # kappa with p_e = 1: both members always predict class 3 -> identical raters, CK = 1.
  labels = np.array([3, 1, 2, 3])
  same = np.full((2, 4), 3)
  assert float(E.diversity(same, labels, 4)[0]) == 1.0
  assert R.diversity(same, labels)[0] == 1.0
  # Empty sample set: every metric 1 ("no observed diversity").
  np.testing.assert_array_equal(E.diversity(HAND_PREDS, HAND_LABELS, 3, jnp.zeros(6, jnp.int32)), np.ones(4))
  np.testing.assert_array_equal(R.diversity(HAND_PREDS[:, :0], HAND_LABELS[:0]), np.ones(4))
  # N = 2 <= L = 4 (EnsembleBench's GD indexes past its histogram here): 3 and 1 failures.
  labels = np.array([0, 0])
  preds = np.array([[1, 1], [1, 0], [1, 0], [0, 0]])
  # m = (3, 1): P1 = 4/(2*4) = 1/2, P2 = (3*2)/(2*4*3) = 1/4 -> GD' = 1/2; l = (1, 3) -> KW = 6/32.
  np.testing.assert_allclose(E.diversity(preds, labels, 2)[2:], [1 - 6 / 32, 0.5], rtol=1e-6)
  np.testing.assert_allclose(R.diversity(preds, labels)[2:], [1 - 6 / 32, 0.5])
  # No member ever fails: GD' = 1 (P1 = 0), KW' = 1, BD' = 1.
  right = np.tile(labels, (3, 1))
  np.testing.assert_array_equal(E.diversity(right, labels, 2)[1:], np.ones(3))


def _random_preds(rng, members, samples, classes, skill=None):
  labels = rng.integers(0, classes, samples)
  skill = rng.uniform(0.4, 0.9, members) if skill is None else skill
  keep = rng.random((members, samples)) < skill[:, None]
  return np.where(keep, labels, rng.integers(0, classes, (members, samples))), labels


@pytest.mark.parametrize('members', [2, 3, 5])
def test_metrics_match_float64_reference(members):
  rng = np.random.default_rng(members)
  for _ in range(3):
    preds, labels = _random_preds(rng, members, 300, 5)
    weights = rng.random(300) < 0.4
    got = E.diversity(preds, labels, 5, jnp.asarray(weights, jnp.int32))
    np.testing.assert_allclose(got, R.diversity(preds[:, weights], labels[weights]), atol=2e-6)
  # The reference's kappa is sklearn's on non-degenerate pairs.
  assert R.cohen_kappa(preds[0], preds[1]) == pytest.approx(cohen_kappa_score(preds[0], preds[1]))


def test_rank_weights_are_true_average_ranks():
  np.testing.assert_array_equal(E.rank_weights(jnp.array([0.9, 0.7, 0.9, 0.5])), [3.5, 2.0, 3.5, 1.0])
  np.testing.assert_array_equal(E.rank_weights(jnp.array([0.2, 0.8, 0.5])), [1.0, 3.0, 2.0])


def test_enumerate_teams():
  teams = E.enumerate_teams(6, 3)
  assert teams.shape == (20, 3)
  assert [tuple(t) for t in teams] == list(itertools.combinations(range(6), 3))


@pytest.mark.parametrize('max_negatives', [None, 25])
def test_focal_scores_match_float64_reference(max_negatives):
  rng = np.random.default_rng(7)
  preds, labels = _random_preds(rng, 6, 240, 4)
  if max_negatives:
    preds[5] = labels  # a perfect member: no negatives, its focal values are all 1 -> normalised 0
  scores = E.focal_diversity(preds, labels, 4, 4, max_negatives=max_negatives, seed=3)
  negatives = E.negative_weights(preds == labels, max_negatives, seed=3)
  if max_negatives:
    assert (negatives.sum(1) <= max_negatives).all() and (negatives <= (preds != labels)).all()
  focal, whole = R.focal_scores(preds, labels, scores.sizes, negatives)
  for teams, f, w in zip(scores.teams, scores.focal, scores.whole):
    np.testing.assert_allclose(f, [focal[tuple(t)] for t in teams], atol=2e-5)
    np.testing.assert_allclose(w, [whole[tuple(t)] for t in teams], atol=2e-6)


def _ref_hq(teams, scores, acc, members, beta):
  as_dict = lambda values: {tuple(t): v for ts, vs in zip(teams, values) for t, v in zip(ts, vs)}
  return R.hq_prune(as_dict(scores), as_dict(acc), members, teams[-1].shape[1], beta)


def _check_hq_equal(teams, scores, acc, members, beta):
  got = E.hq_prune(teams, scores, acc, beta, members)
  chosen, best, survivors = _ref_hq(teams, scores, acc, members, beta)
  for i, s in enumerate(got.sizes):
    assert {tuple(t) for t in teams[i][got.survivors[i]]} == survivors[s]
    assert (tuple(teams[i][got.chosen[i]]) if got.chosen[i] >= 0 else None) == chosen[s]
  got_best = tuple(teams[got.sizes.index(got.best_size)][got.best_index]) if got.best_index >= 0 else None
  assert got_best == best
  return got


@pytest.mark.parametrize('beta', [0.0, 0.1, 0.3, 0.6])
def test_hq_matches_reference_with_ties(beta):
  rng = np.random.default_rng(int(beta * 10))
  members = 7
  teams = [E.enumerate_teams(members, s) for s in range(2, 6)]
  # Coarse values force ties in score and in accuracy, exercising every tie-break.
  scores = [np.round(rng.random(len(t)), 1) for t in teams]
  acc = [np.round(rng.random(len(t)), 1) for t in teams]
  got = _check_hq_equal(teams, scores, acc, members, beta)
  for i, t in enumerate(teams):
    assert len(got.pruned[i]) == E.prune_count(len(got.pruned[i]) + len(got.survivors[i]), beta)


def test_hq_end_to_end_matches_reference():
  rng = np.random.default_rng(11)
  members = 7
  preds, labels = _random_preds(rng, members, 300, 5)
  probs = rng.dirichlet(np.ones(5), (members, 300)).astype(np.float32)
  probs[np.arange(members)[:, None], np.arange(300), preds] += 1.0  # argmax = preds
  probs /= probs.sum(-1, keepdims=True)
  scores = E.focal_diversity(preds, labels, 5, 4)
  ref_focal, _ = R.focal_scores(preds, labels, scores.sizes)
  acc = E.accuracies_by_size(probs, labels, scores.teams)
  for j in range(4):
    for beta in (0.1, 0.3):
      ours = E.hq_prune(scores.teams, [f[:, j] for f in scores.focal], [a[:, 1] for a in acc], beta)
      chosen, best, _ = _ref_hq(scores.teams, [np.array([ref_focal[tuple(t)][j] for t in ts]) for ts in scores.teams],
                                [a[:, 1] for a in acc], members, beta)
      assert [tuple(t[c]) if c >= 0 else None for t, c in zip(scores.teams, ours.chosen)] == [
          chosen[s] for s in scores.sizes]
      assert tuple(scores.teams[ours.sizes.index(ours.best_size)][ours.best_index]) == best


def _constructed_pool():
  """Members 0 and 1 identical; 2..5 each share 3 errors with 0 and at most 2 with each other."""
  samples, classes = 120, 10
  labels = np.arange(samples) % classes
  errors = [set(range(12)), set(range(12)), {0, 1, 2, *range(20, 29)}, {3, 4, 5, *range(27, 36)},
            {6, 7, 8, *range(34, 43)}, {9, 10, 11, *range(41, 50)}]
  preds = np.tile(labels, (len(errors), 1))
  for i, e in enumerate(errors):
    idx = np.array(sorted(e))
    preds[i, idx] = (labels[idx] + 1 + max(i - 1, 0)) % classes
  probs = np.full((len(errors), samples, classes), 0.3 / (classes - 1), np.float32)
  np.put_along_axis(probs, preds[..., None], 0.7, axis=-1)
  return preds, labels, probs, errors


def test_duplicated_members_never_chosen_together():
  preds, labels, probs, errors = _constructed_pool()
  scores = E.focal_diversity(preds, labels, 10, 4)
  acc = E.accuracies_by_size(probs, labels, scores.teams)
  pairs = [tuple(t) for t in scores.teams[0]]
  dup = pairs.index((0, 1))
  beta = 0.2
  for j, metric in enumerate(E.DIVERSITIES):
    pair_scores = scores.focal[0][:, j]
    # A duplicated pair attains every metric's upper bound for both focal members: normalised 1.
    assert pair_scores[dup] == pytest.approx(1.0)
    assert np.sum(pair_scores >= pair_scores[dup] - 1e-6) <= E.prune_count(len(pairs), beta)
    result = E.hq_prune(scores.teams, [f[:, j] for f in scores.focal], [a[:, 1] for a in acc], beta)
    assert dup in result.pruned[0], metric
    for i, teams in enumerate(scores.teams):
      together = (teams == 0).any(1) & (teams == 1).any(1)
      assert not together[result.survivors[i]].any(), (metric, teams.shape[1])
    if metric != 'CK':  # BD, KW, GD: disjoint errors are each focal member's minimum
      i, k = pairs[result.chosen[0]]
      assert not errors[i] & errors[k], (metric, i, k)


def test_voting_rules():
  # 3 members, 2 samples, 3 classes. Sample 0: votes 0, 1, 2 (three-way tie) -> largest mean prob.
  probs = np.array([[[0.5, 0.3, 0.2], [0.6, 0.4, 0.0]],
                    [[0.1, 0.6, 0.3], [0.6, 0.4, 0.0]],
                    [[0.1, 0.1, 0.8], [0.0, 0.1, 0.9]]], np.float32)
  # Sample 0 mean: (0.233, 0.333, 0.433) -> 2 both ways; sample 1 votes (2, 0, 1) -> 0, mean (0.4, 0.3, 0.3) -> 0.
  np.testing.assert_array_equal(E.plurality_vote(probs), [2, 0])
  np.testing.assert_array_equal(E.soft_vote(probs), [2, 0])
  # Plurality differs from soft: two members narrowly prefer class 1, one strongly prefers 0.
  probs = np.array([[[0.45, 0.55]], [[0.45, 0.55]], [[1.0, 0.0]]], np.float32)
  assert int(E.plurality_vote(probs)[0]) == 1 and int(E.soft_vote(probs)[0]) == 0


def test_team_accuracies_match_reference():
  rng = np.random.default_rng(5)
  probs = rng.dirichlet(np.ones(4) * 0.5, (6, 150)).astype(np.float32)
  probs[..., 0] += 0.2 * rng.integers(0, 2, (6, 150))  # makes plurality ties and votes != soft
  labels = rng.integers(0, 4, 150)
  teams = E.enumerate_teams(6, 3)
  got = np.asarray(E.team_accuracies(jnp.asarray(probs), jnp.asarray(labels), jnp.asarray(teams), chunk=7))
  want = np.array([R.team_accuracy(probs, labels, tuple(t)) for t in teams])
  np.testing.assert_allclose(got, want, atol=1e-6)
  assert (want[:, 0] != want[:, 1]).any()


def test_predict_proba_matches_member_loop():
  model = models.create_model('fc', (8, 8), 10)
  members = 3
  thetas = [models.init_params(model, jax.random.PRNGKey(i), (8, 8, 1)) for i in range(members)]
  rng = np.random.default_rng(0)
  masks = [tuple(jnp.asarray(rng.random(8) < 0.6, jnp.float32) for _ in range(2)) for _ in range(members)]
  images = jnp.asarray(rng.integers(0, 256, (37, 8, 8, 1)), jnp.uint8)
  stack = lambda xs: jax.tree.map(lambda *a: jnp.stack(a), *xs)
  got = E.predict_proba(E.flax_apply_fn(model), stack(thetas), stack(masks), images, 16)
  assert got.shape == (members, 37, 10)
  for i in range(members):
    logits, _ = model.apply({'params': thetas[i]}, images, masks[i], train=False)
    np.testing.assert_allclose(got[i], jax.nn.softmax(logits), atol=1e-6)


def test_report_uses_validation_only_and_writes_files(tmp_path):
  preds, labels, probs, _ = _constructed_pool()
  members = [{'metric': 'min', 'seed': i % 2, 'cycle': i, 'fraction_remaining': 0.8 ** i,
              'macs': 100.0 * 0.8 ** i} for i in range(6)]
  rng = np.random.default_rng(1)
  test_probs = rng.dirichlet(np.ones(10), (6, 50)).astype(np.float32)
  test_labels = rng.integers(0, 10, 50)
  pool = E.evaluate_pool('min', members, probs, labels, test_probs, test_labels, max_size=4, betas=(0.2,))
  # Selection ignores test data: other test predictions give the same picks.
  other = E.evaluate_pool('min', members, probs, labels, test_probs[:, ::-1], test_labels[::-1],
                          max_size=4, betas=(0.2,))
  assert all(pool.hq[k].chosen == other.hq[k].chosen for k in pool.hq)
  paths = E.write_report([pool], tmp_path)
  records = [json.loads(line) for line in open(paths[0])]
  full = next(r for r in records if r['selection'] == 'full')
  assert full['test_accuracy_soft'] == pytest.approx(R.team_accuracy(test_probs, test_labels, tuple(range(6)))[1])
  hq = [r for r in records if r['selection'] == 'hq']
  assert {r['diversity_metric'] for r in hq if r['overall']} == set(E.DIVERSITIES)
  for r in hq:
    team = tuple(r['members'])
    assert not {0, 1} <= set(team)
    assert r['cost_macs'] == pytest.approx(sum(members[i]['macs'] for i in team) / sum(m['macs'] for m in members))
    assert r['cost_members'] == pytest.approx(len(team) / 6)
    plural, soft = R.team_accuracy(test_probs, test_labels, team)
    assert (r['test_accuracy_plurality'], r['test_accuracy_soft']) == pytest.approx((plural, soft))
  table = open(paths[1]).read()
  assert table.count('| min |') == 2 + len(E.DIVERSITIES)
  for p in paths[2:]:
    assert open(p, 'rb').read(8) == b'\x89PNG\r\n\x1a\n'


def test_report_figures_keep_legends_off_the_data_and_fade_dense_points(tmp_path, monkeypatch):
  rng = np.random.default_rng(0)
  count, samples = 12, 60
  labels = np.arange(samples) % 10
  probs = rng.dirichlet(np.ones(10), (count, samples)).astype(np.float32)
  members = [{'metric': 'min', 'seed': 0, 'cycle': i, 'fraction_remaining': 0.8 ** i, 'macs': 100.0 * 0.8 ** i}
             for i in range(count)]
  pool = E.evaluate_pool('min', members, probs, labels, probs, labels, max_size=4, betas=(0.0, 0.5))
  teams = sum(len(t) for t in pool.teams)  # 66 + 220 + 495
  figures = {}

  def keep(fig, path):  # instead of writing the PNG
    figures[path] = fig
    return path

  monkeypatch.setattr(E.report, '_save', keep)
  E.plot_accuracy_vs_cost([pool], 'cost.png')
  E.plot_focal_vs_accuracy([pool], 'focal.png')
  for fig in figures.values():
    fig.canvas.draw()
    legend = fig.axes[-1].get_legend().get_window_extent()
    assert not any(legend.overlaps(ax.get_window_extent()) for ax in fig.axes)
  cost = figures['cost.png']
  every_team = cost.axes[0].collections[0]
  assert len(every_team.get_offsets()) == teams and every_team.get_alpha() < 0.5  # 781 teams: faint
  texts = [t.get_text() for t in cost.axes[0].texts]
  key = next(t for t in texts if t.startswith('HQ overall picks:'))
  # Every overall pick is numbered on the panel and keyed below it, with all measures named.
  assert all(d in key for d in E.DIVERSITIES)
  numbers = [t for t in texts if t.isdigit()]
  assert numbers == [str(i) for i in range(1, len(numbers) + 1)] and key.count('\n') == len(numbers)
  focal = figures['focal.png']
  assert [ax.get_title().split(',')[0] for ax in focal.axes] == list(E.DIVERSITIES)
  assert all(', r = ' in ax.get_title() for ax in focal.axes)
  assert all(c.get_alpha() < 1 for ax in focal.axes for c in ax.collections)
