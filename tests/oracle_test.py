"""The greedy oracle agrees with a plain-Python brute force, and mask similarity is as defined."""

from fractions import Fraction

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dropnet_jax import models

from dropnet_jax.pruning import oracle

MODEL = models.MLP(widths=(4, 3), num_classes=3)


@pytest.fixture(scope='module')
def setup():
  key_p, key_x, key_y = jax.random.split(jax.random.key(3), 3)
  params = models.init_params(MODEL, key_p, (6, 6, 1))
  images = jax.random.randint(key_x, (40, 6, 6, 1), 0, 256).astype(jnp.uint8)
  labels = jax.random.randint(key_y, (40,), 0, 3)
  return params, images, labels


def brute_force(params, masks, images, labels, fraction):
  """Greedy by hand: every single-unit removal through model.apply, pick the min (first on ties)."""
  masks = [np.array(m, np.float32) for m in masks]
  remaining = int(sum(m.sum() for m in masks))
  count = min(max(int(Fraction(str(fraction)) * remaining), 1), remaining - 1)
  for _ in range(count):
    best = None
    for layer, m in enumerate(masks):
      for unit in range(m.size):
        if m[unit] == 0:
          continue
        trial = [t.copy() for t in masks]
        trial[layer][unit] = 0
        logits, _ = MODEL.apply({'params': params}, images, tuple(jnp.asarray(t) for t in trial))
        loss = float(optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean())
        if best is None or loss < best[0]:
          best = (loss, layer, unit)
    masks[best[1]][best[2]] = 0
  return masks


def assert_masks_equal(got, want):
  assert len(got) == len(want)
  for g, w in zip(got, want):
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


START = {
    'full': (np.ones(4), np.ones(3)),
    'predropped': (np.array([0., 1, 1, 0]), np.array([1., 0, 1])),
}


@pytest.mark.parametrize('start', sorted(START))
@pytest.mark.parametrize('fraction', [0.2, 0.5, 0.7, 1.0])
def test_agrees_with_brute_force(setup, start, fraction):
  params, images, labels = setup
  masks = tuple(jnp.asarray(m, jnp.float32) for m in START[start])
  got = oracle.oracle_mask(MODEL.apply, params, masks, images, labels, fraction, batch_size=16, candidate_chunk=3)
  assert_masks_equal(got, brute_force(params, masks, images, labels, fraction))


def test_candidate_losses_match_direct_evaluation(setup):
  params, images, labels = setup
  masks = tuple(jnp.asarray(m, jnp.float32) for m in START['predropped'])
  got = oracle.candidate_losses(MODEL.apply, params, masks, images, labels, batch_size=16, candidate_chunk=2)
  for layer, m in enumerate(masks):
    for unit in range(m.size):
      trial = list(masks)
      trial[layer] = trial[layer].at[unit].set(0.)
      logits, _ = MODEL.apply({'params': params}, images, tuple(trial))
      want = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
      np.testing.assert_allclose(got[layer][unit], want, rtol=1e-5)


def test_chunking_and_batching_do_not_change_the_result(setup):
  params, images, labels = setup
  masks = models.full_masks(MODEL)
  ref = oracle.greedy_oracle(MODEL.apply, params, masks, images, labels, 0.7)
  for bs, chunk in [(7, 1), (40, 7), (13, 5)]:
    r = oracle.greedy_oracle(MODEL.apply, params, masks, images, labels, 0.7, batch_size=bs, candidate_chunk=chunk)
    assert_masks_equal(r.masks, ref.masks)
    np.testing.assert_array_equal(r.order, ref.order)
    np.testing.assert_allclose(r.losses, ref.losses, rtol=1e-5)


def test_trace_and_no_recompilation(setup):
  params, images, labels = setup
  masks = models.full_masks(MODEL)
  r = oracle.greedy_oracle(MODEL.apply, params, masks, images, labels, 0.5, batch_size=16)
  assert int(r.num_dropped) == 3
  order = np.asarray(r.order)
  assert (order[3:] == -1).all() and len(set(order[:3])) == 3
  assert np.isnan(np.asarray(r.losses)[3:]).all()
  cache = oracle._greedy._cache_size()
  # Another fraction and another mask: the same compiled program.
  r2 = oracle.greedy_oracle(MODEL.apply, params, r.masks, images, labels, 0.2, batch_size=16)
  assert int(r2.num_dropped) == 1
  assert oracle._greedy._cache_size() == cache


def test_max_examples_uses_the_first_examples(setup):
  params, images, labels = setup
  masks = models.full_masks(MODEL)
  a = oracle.oracle_mask(MODEL.apply, params, masks, images, labels, 0.5, max_examples=10)
  b = oracle.oracle_mask(MODEL.apply, params, masks, images[:10], labels[:10], 0.5)
  assert_masks_equal(a, b)
  assert_masks_equal(a, brute_force(params, masks, images[:10], labels[:10], 0.5))


def tied_params(params):
  """The classifier zeroed: every mask gives the same logits (0), so every candidate ties."""
  tied = jax.tree.map(lambda x: x, params)
  tied['Dense_2'] = jax.tree.map(jnp.zeros_like, tied['Dense_2'])
  return tied


def test_ties_go_to_lowest_index(setup):
  params, images, labels = setup
  got = oracle.oracle_mask(MODEL.apply, tied_params(params), models.full_masks(MODEL), images, labels, 0.5)
  assert_masks_equal(got, ([0., 0, 0, 1], [1., 1, 1]))  # 7 units -> drop 3: flat indices 0, 1, 2
  got = oracle.oracle_mask(MODEL.apply, tied_params(params), models.full_masks(MODEL), images, labels, 0.9)
  assert_masks_equal(got, ([0., 0, 0, 0], [0., 0, 1]))  # floor(6.3) = 6


def test_already_dropped_units_are_never_chosen(setup):
  params, images, labels = setup
  start = (jnp.array([0., 0, 1, 1]), jnp.array([1., 0, 1]))
  # All tied: without the +inf for dropped units, the lowest index (unit 0, already dropped) would win.
  r = oracle.greedy_oracle(MODEL.apply, tied_params(params), start, images, labels, 0.5)
  assert_masks_equal(r.masks, ([0., 0, 0, 0], [1., 0, 1]))  # 4 remain -> drop 2: flat 2, 3
  # With real params, drop all but one: the pre-dropped units never appear in the order.
  r = oracle.greedy_oracle(MODEL.apply, params, start, images, labels, 1.0)
  order = np.asarray(r.order)[:int(r.num_dropped)]
  assert int(r.num_dropped) == 3 and len(set(order.tolist())) == 3
  assert not set(order.tolist()) & {0, 1, 5}
  flat = np.concatenate([np.asarray(m) for m in r.masks])
  assert flat.sum() == 1 and flat[[0, 1, 5]].sum() == 0


def test_single_remaining_unit_is_kept(setup):
  params, images, labels = setup
  start = (jnp.array([0., 0, 1, 0]), jnp.array([0., 0, 0]))
  r = oracle.greedy_oracle(MODEL.apply, params, start, images, labels, 0.5)
  assert int(r.num_dropped) == 0
  assert_masks_equal(r.masks, start)


def test_mask_similarity_hand_worked():
  a = (np.array([1, 1, 0, 0]), np.array([1, 0]))
  b = (np.array([1, 0, 1, 0]), np.array([1, 0]))
  assert oracle.mask_similarity(a, b) == pytest.approx(2 / 3)  # b keeps {0, 2, 4}; a keeps 0 and 4 of them
  assert oracle.mask_similarity(b, b) == 1.0
  assert oracle.mask_similarity((np.array([0, 1]),), (np.array([1, 0]),)) == 0.0
  # Different counts: relative to the reference (second argument).
  big, small = (np.ones(4),), (np.array([1., 0, 0, 0]),)
  assert oracle.mask_similarity(big, small) == 1.0
  assert oracle.mask_similarity(small, big) == 0.25
  with pytest.raises(ValueError):
    oracle.mask_similarity((np.ones(3),), (np.ones(4),))
  with pytest.raises(ValueError):
    oracle.mask_similarity((np.ones(3),), (np.zeros(3),))


class _BNNet(nn.Module):
  """Dense -> BatchNorm -> ReLU -> mask -> Dense: checks the 'batch_stats' path (extra_variables)."""

  @nn.compact
  def __call__(self, images, masks, train=False):
    x = models.to_float(images).reshape((images.shape[0], -1))
    x = nn.BatchNorm(use_running_average=not train)(nn.Dense(4)(x))
    x, s = models.masked_relu(x, masks[0])
    return nn.Dense(3)(x), (s,)


def test_extra_variables_batch_stats(setup):
  _, images, labels = setup
  net = _BNNet()
  masks = (jnp.ones(4),)
  variables = net.init(jax.random.key(0), images[:1], masks)
  stats = jax.tree.map(lambda a: a + 0.3, variables['batch_stats'])  # running stats matter
  got = oracle.candidate_losses(net.apply, variables['params'], masks, images, labels,
                                extra_variables={'batch_stats': stats})
  for u in range(4):
    logits, _ = net.apply({'params': variables['params'], 'batch_stats': stats}, images, (masks[0].at[u].set(0.),))
    want = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    np.testing.assert_allclose(got[0][u], want, rtol=1e-5)
  new = oracle.oracle_mask(net.apply, variables['params'], masks, images, labels, 0.5,
                           extra_variables={'batch_stats': stats})
  assert int(new[0].sum()) == 2
