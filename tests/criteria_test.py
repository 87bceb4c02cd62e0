"""The criteria registry: the activation criteria against hand-worked cases and properties."""

import math
from fractions import Fraction

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dropnet_jax.pruning import criteria

from dropnet_jax.pruning import masks as mask_ops
from dropnet_jax.models.layers import StatSums

KEY = jax.random.key(0)
ACTIVATION = ('min', 'max', 'random', 'min_layer', 'max_layer', 'random_layer', 'apoz', 'apoz_layer')


def update_mask(masks, scores, metric, fraction, key):
  """The registered criterion `metric` on sums whose per-unit means are `scores` (count 1)."""
  sums = StatSums(tuple(scores), tuple(scores), jnp.float32(1.0))
  inputs = criteria.PruneInputs(None, sums, tuple(masks), key, fraction)
  return criteria.get(metric)(inputs, criteria.Context())
FULL = (jnp.ones(4), jnp.ones(4))
SCORES = (jnp.array([0.5, 0.1, 0.9, 0.3]), jnp.array([0.2, 0.8, 0.05, 0.7]))


def as_lists(masks):
  return [np.asarray(m).astype(int).tolist() for m in masks]


@pytest.mark.parametrize('metric,fraction,expected', [
    # Global: 8 remaining, int(0.25 * 8) = 2 units over both layers.
    ('min', 0.25, [[1, 0, 1, 1], [1, 1, 0, 1]]),  # 0.1 and 0.05
    ('max', 0.25, [[1, 1, 0, 1], [1, 0, 1, 1]]),  # 0.9 and 0.8
    # Layer-wise: int(0.5 * 4) = 2 units in each layer.
    ('min_layer', 0.5, [[1, 0, 1, 0], [0, 1, 0, 1]]),
    ('max_layer', 0.5, [[0, 1, 0, 1], [1, 0, 1, 0]]),
    # Global min with 0.5: 4 lowest of all 8: 0.05, 0.1, 0.2, 0.3 (layer 1 loses two, layer 0 two).
    ('min', 0.5, [[1, 0, 1, 0], [0, 1, 0, 1]]),
    # Fraction so small that int() gives 0: one unit is still dropped.
    ('min', 0.01, [[1, 1, 1, 1], [1, 1, 0, 1]]),
    ('max_layer', 0.01, [[1, 1, 0, 1], [1, 0, 1, 1]]),
])
def test_hand_worked(metric, fraction, expected):
  got = update_mask(FULL, SCORES, metric, fraction, KEY)
  assert as_lists(got) == expected


def test_already_dropped_units_are_never_chosen_again():
  masks = (jnp.array([1., 0., 1., 1.]), jnp.ones(4))
  scores = (jnp.array([0.5, 0.0, 0.9, 0.3]), jnp.array([0.2, 0.8, 0.05, 0.7]))
  # 7 remaining, int(0.34 * 7) = 2: the two lowest *kept* scores, 0.05 and 0.2, not the dropped 0.0.
  got = update_mask(masks, scores, 'min', 0.34, KEY)
  assert as_lists(got) == [[1, 0, 1, 1], [0, 1, 0, 1]]
  # max must not resurrect or re-pick dropped units either, even with a huge score there.
  scores = (jnp.array([0.5, 99.0, 0.9, 0.3]), jnp.array([0.2, 0.8, 0.05, 0.7]))
  got = update_mask(masks, scores, 'max', 0.15, KEY)  # int(1.05) = 1: the 0.9
  assert as_lists(got) == [[1, 0, 0, 1], [1, 1, 1, 1]]


def test_apoz_drops_units_that_are_zero_most_often():
  sums = StatSums(abs_sum=(jnp.array([1., 1., 1.]),), zero_sum=(jnp.array([2., 9., 5.]),),
                  count=jnp.array(10.))
  chex.assert_trees_all_close(criteria.apoz(sums), (jnp.array([0.2, 0.9, 0.5]),))
  inputs = criteria.PruneInputs(None, sums, (jnp.ones(3),), KEY, 0.34)  # int(1.02) = 1
  got = criteria.get('apoz')(inputs, criteria.Context())
  assert as_lists(got) == [[1, 0, 1]]


def test_unit_scores_are_means_over_examples():
  sums = StatSums(abs_sum=(jnp.array([3., 6.]), jnp.array([0., 1.5])),
                          zero_sum=(jnp.zeros(2), jnp.zeros(2)), count=jnp.array(3.))
  chex.assert_trees_all_close(criteria.mean_abs(sums), (jnp.array([1., 2.]), jnp.array([0., 0.5])))


def test_ties_are_broken_at_random_with_exact_counts():
  masks = (jnp.ones(4), jnp.ones(4))
  tied = (jnp.ones(4), jnp.ones(4))
  seen = set()
  for i in range(40):
    got = update_mask(masks, tied, 'min', 0.25, jax.random.key(i))
    flat = np.concatenate([np.asarray(m) for m in got])
    assert flat.sum() == 6
    seen.add(tuple(np.flatnonzero(flat == 0)))
  assert len(seen) > 5  # many different pairs, not a fixed choice
  # Same key, same choice: the tie-break is a pure function of the key.
  a = update_mask(masks, tied, 'min', 0.25, jax.random.key(3))
  b = update_mask(masks, tied, 'min', 0.25, jax.random.key(3))
  chex.assert_trees_all_equal(a, b)


def test_ties_only_among_equal_scores():
  # Scores 1, 1, 2, 2: dropping one of the lowest must pick unit 0 or 1, never 2 or 3.
  for i in range(20):
    got = update_mask((jnp.ones(4),), (jnp.array([1., 1., 2., 2.]),), 'min', 0.25, jax.random.key(i))
    assert np.flatnonzero(np.asarray(got[0]) == 0).tolist() in ([0], [1])


@pytest.mark.parametrize('metric', ['random', 'random_layer'])
def test_random_metrics_drop_exact_counts_uniformly(metric):
  masks = (jnp.ones(10), jnp.array([1.] * 6 + [0.] * 4))
  counts = np.zeros(20)
  for i in range(300):
    got = update_mask(masks, (jnp.zeros(10), jnp.zeros(10)), metric, 0.5, jax.random.key(i))
    a, b = (np.asarray(m) for m in got)
    assert (b[6:] == 0).all()  # dropped stay dropped
    if metric == 'random':
      assert a.sum() + b.sum() == 8  # int(0.5 * 16) = 8 of 16 remaining
    else:
      assert a.sum() == 5 and b.sum() == 3  # int(0.5 * 10) and int(0.5 * 6)
    counts += 1 - np.concatenate([a, b])
  # Each kept unit is dropped about half the time (binomial sd ~ 8.7 around 150).
  assert np.all(np.abs(counts[:16] - 150) < 45), counts


def test_never_drops_the_last_unit():
  one_left = (jnp.array([0., 1., 0.]),)
  for metric in ('min', 'min_layer', 'random'):
    got = update_mask(one_left, (jnp.ones(3),), metric, 1.0, KEY)
    assert as_lists(got) == [[0, 1, 0]]
  # fraction 1 of a full layer drops all but one.
  got = update_mask((jnp.ones(5),), (jnp.arange(5.),), 'min', 1.0, KEY)
  assert as_lists(got) == [[0, 0, 0, 0, 1]]


def test_num_to_drop_is_the_exact_decimal_floor():
  # Reference: floor(p * remaining) in exact rational arithmetic of the decimal p. (Python's
  # int(0.7 * 90) is 62 because 0.7 * 90 == 62.99999999999999 in float64; we take 63.)
  fractions = ['0.1', '0.15', '0.2', '0.25', '0.3', '0.33', '0.4', '0.5', '0.6', '0.7', '0.75', '0.8', '0.9', '1']
  remaining = np.arange(1, 2001)
  for f in fractions:
    got = np.asarray(mask_ops.num_to_drop(float(f), remaining))
    want = np.array([math.floor(Fraction(f) * int(r)) for r in remaining])
    np.testing.assert_array_equal(got, want, err_msg=f'fraction {f}')


@pytest.mark.parametrize('metric', ACTIVATION)
def test_masks_only_shrink_and_jit_matches_eager(metric):
  rng = np.random.default_rng(0)
  masks = (jnp.ones(30), jnp.ones(17))
  jitted = jax.jit(update_mask, static_argnames='metric')
  for cycle in range(12):
    scores = tuple(jnp.asarray(rng.random(m.shape), jnp.float32) for m in masks)
    key = jax.random.key(cycle)
    new = update_mask(masks, scores, metric, 0.2, key)
    chex.assert_trees_all_equal(new, jitted(masks, scores, metric, 0.2, key))
    for old_m, new_m in zip(masks, new):
      assert np.all(np.asarray(new_m) <= np.asarray(old_m))  # only shrinks; dropped stay dropped
      assert set(np.unique(np.asarray(new_m))) <= {0.0, 1.0}
    before, after = sum(float(m.sum()) for m in masks), sum(float(m.sum()) for m in new)
    if metric.endswith('_layer'):
      for old_m, new_m in zip(masks, new):
        r = int(old_m.sum())
        assert int(r - new_m.sum()) == (min(max(int(0.2 * r), 1), r - 1))
    else:
      assert before - after == min(max(int(0.2 * before), 1), before - 1)
    masks = new


def test_bad_arguments_are_named():
  with pytest.raises(ValueError, match='unknown metric'):
    update_mask(FULL, SCORES, 'median', 0.2, KEY)
  with pytest.raises(ValueError, match='shape'):
    update_mask(FULL, (jnp.ones(4), jnp.ones(5)), 'min', 0.2, KEY)


def test_fraction_helpers():
  masks = (jnp.array([1., 0., 1.]), jnp.array([1., 1., 1., 1., 0.]))
  assert mask_ops.units_per_layer(masks) == [2, 4]
  assert mask_ops.fraction_remaining(masks) == 6 / 8


def test_registry_names_every_criterion_once():
  assert set(ACTIVATION) | {'oracle'} <= set(criteria.names())
  with pytest.raises(ValueError, match='registered twice'):
    criteria.register('min')(lambda inputs, context: inputs.mask)
  with pytest.raises(ValueError, match='unknown metric'):
    criteria.get('median')
  assert set(criteria.names('weight')) == {'global_l1', 'layer_l1', 'global_random', 'layer_random'}
  assert not set(criteria.names('weight')) & set(criteria.names('unit'))
  with pytest.raises(ValueError, match='unknown metric'):
    criteria.get('global_l1', 'unit')  # a weight criterion is no DropNet metric


# -- the official notebook's rule -------------------------------------------------------------

OFFICIAL_CASES = [
    # p = 0.25, 8 kept: k = 2, threshold = 3rd lowest (0.2); candidates 0.1 (layer 0), 0.05 and 0.2
    # (layer 1); layer 0 first drops its 0.1, then one of layer 1's two candidates at random.
    ('min_official', [[[1, 0, 1, 1], [1, 1, 0, 1]], [[1, 0, 1, 1], [0, 1, 1, 1]]]),
    # max: threshold = 3rd highest (0.7); 0.9 (layer 0) goes, then 0.8 or 0.7 (layer 1).
    ('max_official', [[[1, 1, 0, 1], [1, 0, 1, 1]], [[1, 1, 0, 1], [1, 1, 1, 0]]]),
]


@pytest.mark.parametrize('metric,outcomes', OFFICIAL_CASES)
def test_official_rule_hand_worked(metric, outcomes):
  seen = {str(as_lists(update_mask(FULL, SCORES, metric, 0.25, jax.random.key(i)))) for i in range(40)}
  assert seen == {str(o) for o in outcomes}  # both, and nothing else
  exact = as_lists(update_mask(FULL, SCORES, metric.replace('_official', ''), 0.25, KEY))
  assert exact == outcomes[0]  # the exact rule: always the two extreme units


def test_official_max_never_empties_a_later_layer():
  # Layer 1's single unit has the highest score; the exact max rule drops it (the layer empties),
  # the official rule spends its budget of 1 on layer 0's candidate first.
  masks = (jnp.ones(7), jnp.ones(1))
  scores = (jnp.arange(1., 8.), jnp.array([10.]))
  for i in range(10):
    official = as_lists(update_mask(masks, scores, 'max_official', 0.2, jax.random.key(i)))
    assert official == [[1, 1, 1, 1, 1, 1, 0], [1]]
  assert as_lists(update_mask(masks, scores, 'max', 0.2, KEY)) == [[1] * 7, [0]]


@pytest.mark.parametrize('metric', ['min_official', 'max_official', 'min_layer_official', 'max_layer_official'])
def test_official_rule_drops_the_same_count_and_only_shrinks(metric):
  rng = np.random.default_rng(1)
  masks = (jnp.ones(30), jnp.ones(17))
  exact_metric = metric.replace('_official', '')
  for cycle in range(10):
    scores = tuple(jnp.asarray(rng.random(m.shape), jnp.float32) for m in masks)
    new = update_mask(masks, scores, metric, 0.2, jax.random.key(cycle))
    exact = update_mask(masks, scores, exact_metric, 0.2, jax.random.key(cycle))
    assert mask_ops.units_per_layer(new) == mask_ops.units_per_layer(exact) or not metric.endswith('_layer') \
        and sum(mask_ops.units_per_layer(new)) == sum(mask_ops.units_per_layer(exact))
    for old_m, new_m in zip(masks, new):
      assert np.all(np.asarray(new_m) <= np.asarray(old_m))
    # At most one unit is swapped against the exact choice (per layer for the layer-wise rule).
    groups = list(zip(new, exact)) if metric.endswith('_layer_official') else [(jnp.concatenate(new),
                                                                                 jnp.concatenate(exact))]
    for a, b in groups:
      assert np.sum(np.asarray(a) != np.asarray(b)) in (0, 2)
    masks = new


def test_a_registered_criterion_runs_in_the_loop_with_no_driver_change():
  """The README's example: a new rule is one registered function; the driver runs it by name."""
  from dropnet_jax import models
  from dropnet_jax.loop import dropnet
  from dropnet_jax.loop.driver import RunIO
  from dropnet_jax.config import DropNetConfig, TrainConfig
  from dropnet_jax.input_pipeline import load_dataset
  from dropnet_jax.training.trainer import DeviceData
  ds = load_dataset('digits')
  model = models.create_model('fc', (12, 12), num_classes=10)

  @criteria.register('test_min_again')
  def min_again(inputs, context):
    return criteria.drop_lowest(tuple(inputs.mask), criteria.mean_abs(inputs.sums), inputs.fraction, inputs.key)

  config = DropNetConfig(metrics=('test_min_again', 'min'), train=TrainConfig(max_epochs=2))
  records = dropnet.run_experiment(model, ds.image_shape, DeviceData.from_dataset(ds), [0], config,
                                   io=RunIO(log=lambda s: None))
  masks = lambda m: [r['mask'] for r in records if r['metric'] == m]
  assert len(masks('min')) > 3 and masks('test_min_again') == masks('min')  # continuous scores: no ties


def test_register_replace_redefines_a_name_for_notebook_cells():
  """Re-running a notebook cell that registers a criterion: replace=True takes the new function; the
  default stays strict, so two modules cannot silently claim one name."""
  name = 'test_notebook_cell_rule'

  def cell():  # the cell's body: a decorated definition, run again
    @criteria.register(name, replace=True)
    def rule(inputs, context):
      return inputs.mask
    return rule

  try:
    first = cell()
    assert criteria.get(name) is first
    second = cell()  # the same cell again: no error, and the new function is the one used
    assert criteria.get(name) is second and second is not first
    assert criteria.names().count(name) == 1
    with pytest.raises(ValueError, match='registered twice.*replace=True'):
      criteria.register(name)(lambda inputs, context: inputs.mask)
    assert criteria.get(name) is second  # the refused registration changed nothing
    weight_rule = criteria.register(name, 'weight', replace=True)(lambda inputs, context: inputs.mask)
    assert criteria.get(name, 'weight') is weight_rule and name not in criteria.names('unit')
  finally:
    criteria._REGISTRY.pop(name, None)
