"""Weight masks and weight criteria: selection, sparsity accounting, masked training, torch's counting rule.

References are independent of the implementation: hand-counted sparsities,
Python's own round() for torch's count rule, a float64 numpy sort for global
L1, and a plain optax update as the negative control of masked training.
"""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dropnet_jax import models
from dropnet_jax.pruning import weight_criteria as wc
from dropnet_jax.pruning import weight_masks as wm

IMAGE_SHAPE = (28, 28, 1)
# Jitted once per module (fraction static: torch's exact count), shared by the tests to save compiles.
JIT = {name: jax.jit(fn, static_argnums=2) for name, fn in wc.WEIGHT_CRITERIA.items()}


def hand_params():
  """A small tree with a conv, a batch norm, a hidden dense layer and the output dense layer (83 numbers)."""
  z = lambda *s: jnp.arange(1, int(np.prod(s)) + 1, dtype=jnp.float32).reshape(s)
  return {'Conv_0': {'kernel': z(2, 2, 1, 3), 'bias': z(3)}, 'bn0': {'scale': z(3), 'bias': z(3)},
          'Dense_0': {'kernel': z(12, 4), 'bias': z(4)}, 'Dense_1': {'kernel': z(4, 2), 'bias': z(2)}}


@functools.lru_cache(maxsize=None)
def model_a_params(seed: int = 0):
  model = models.create_model('fc', (16, 16), 10)
  return model, models.init_params(model, jax.random.PRNGKey(seed), IMAGE_SHAPE)


def test_prunable_selection():
  p = hand_params()
  kernels = {'Conv_0/kernel', 'Dense_0/kernel', 'Dense_1/kernel'}
  assert set(wm.prunable_names(p)) == kernels
  assert set(wm.prunable_names(p, biases=True)) == kernels | {'Conv_0/bias', 'Dense_0/bias', 'Dense_1/bias'}
  assert set(wm.prunable_names(p, batch_norm=True)) == kernels | {'bn0/scale', 'bn0/bias'}
  assert wm.output_layer_name(p) == 'Dense_1'
  assert set(wm.prunable_names(p, biases=True, output_layer=False)) == {'Conv_0/kernel', 'Conv_0/bias',
                                                                       'Dense_0/kernel', 'Dense_0/bias'}
  assert set(wm.prunable_names(p, output_layer=False, output_name='Dense_0')) == {'Conv_0/kernel', 'Dense_1/kernel'}
  # A batch-norm model's variables dict: running statistics are never selected.
  theta = {'params': p, 'batch_stats': {'bn0': {'mean': jnp.zeros(3), 'var': jnp.ones(3)}}}
  assert set(wm.prunable_names(theta, batch_norm=True, output_layer=False)) == {
      'params/Conv_0/kernel', 'params/Dense_0/kernel', 'params/bn0/scale', 'params/bn0/bias'}
  # The real models' classifiers.
  assert wm.output_layer_name(model_a_params()[1]) == 'Dense_2'
  conv = models.create_model('conv', (4, 4), 10)
  assert wm.output_layer_name(jax.eval_shape(lambda: models.init_params(conv, jax.random.PRNGKey(0),
                                                                          IMAGE_SHAPE))) == 'Dense_0'


def test_sparsity_report_counts_by_hand():
  p = hand_params()
  w = wm.init_weight_mask(p)
  w['Conv_0']['kernel'] = w['Conv_0']['kernel'].at[0, 1].set(0.0)  # 3 of 12 pruned
  w['Dense_0']['kernel'] = w['Dense_0']['kernel'].at[:3].set(0.0)  # 12 of 48 pruned
  r = wm.sparsity_report(p, w)
  assert r['prunable_params'] == 12 + 48 + 8 and r['prunable_kept'] == 68 - 15
  assert r['total_params'] == 12 + 3 + 3 + 3 + 48 + 4 + 8 + 2 and r['total_kept'] == 83 - 15
  assert r['prunable_sparsity'] == pytest.approx(15 / 68) and r['global_sparsity'] == pytest.approx(15 / 83)
  assert r['layers'] == {'Conv_0/kernel': {'size': 12, 'kept': 9, 'sparsity': 0.25},
                         'Dense_0/kernel': {'size': 48, 'kept': 36, 'sparsity': 0.25},
                         'Dense_1/kernel': {'size': 8, 'kept': 8, 'sparsity': 0.0}}
  json.dumps(r)
  # Running statistics are not params.
  theta = {'params': p, 'batch_stats': {'bn0': {'mean': jnp.zeros(3), 'var': jnp.ones(3)}}}
  assert wm.sparsity_report(theta, wm.init_weight_mask(theta))['total_params'] == 83


def test_apply_weight_mask_zeroes_exactly_the_pruned_entries():
  p = hand_params()
  w = wm.init_weight_mask(p, biases=True)
  w['Dense_0']['bias'] = jnp.array([1.0, 0.0, 1.0, 0.0])
  w['Dense_1']['kernel'] = w['Dense_1']['kernel'].at[2, 1].set(0.0)
  out = jax.jit(wm.apply_weight_mask)(p, w)
  np.testing.assert_array_equal(out['Dense_0']['bias'], [1.0, 0.0, 3.0, 0.0])
  expected = np.asarray(p['Dense_1']['kernel']).copy()
  expected[2, 1] = 0.0
  np.testing.assert_array_equal(out['Dense_1']['kernel'], expected)
  for name in ('Conv_0', 'Dense_0'):
    np.testing.assert_array_equal(out[name]['kernel'], p[name]['kernel'])
  np.testing.assert_array_equal(out['bn0']['scale'], p['bn0']['scale'])
  bad = {'Dense_0': {'kernel': jnp.ones((4, 12))}}
  with pytest.raises(ValueError, match='shape'):
    wm.apply_weight_mask(p, bad)
  with pytest.raises(ValueError, match='not in the tree'):
    wm.apply_weight_mask(p, {'Dense_9': {'kernel': jnp.ones(1)}})


def test_encodings():
  _, p = model_a_params()
  w = JIT['global_l1'](p, wm.init_weight_mask(p), 0.3)
  again = JIT['global_l1'](p, wm.init_weight_mask(p), 0.3)
  enc = wm.encode_weight_mask(w)
  json.dumps(enc)
  assert enc['kept'] == {n: int(np.sum(np.asarray(m))) for n, m in wm.named_leaves(w).items()}
  assert enc['fingerprint'] == wm.mask_fingerprint(again)
  flipped = jax.tree.map(lambda m: m, w)
  flipped['Dense_1']['kernel'] = 1.0 - flipped['Dense_1']['kernel']
  assert wm.mask_fingerprint(flipped) != enc['fingerprint']


@pytest.mark.parametrize('name', sorted(wc.WEIGHT_CRITERIA))
def test_masks_only_shrink_and_counts_follow_torch(name):
  """Params change between prunes (as in training); pruned weights stay pruned, counts are round(f * kept)."""
  crit = JIT[name]
  _, p = model_a_params()
  w = wm.init_weight_mask(p)
  layerwise = name.startswith('layer')
  for i, f in enumerate((0.2, 0.5, 0.2, 0.5)):
    _, p = model_a_params(seed=i + 1)
    new = crit(p, w, fraction=f, key=jax.random.PRNGKey(i))
    old_k, new_k = wm.kept_counts(w), wm.kept_counts(new)
    for a, b in zip(jax.tree.leaves(w), jax.tree.leaves(new)):
      assert set(np.unique(np.asarray(b))) <= {0.0, 1.0}
      assert np.all(np.asarray(b) <= np.asarray(a))
    if layerwise:
      assert new_k == {n: k - round(f * k) for n, k in old_k.items()}
    else:
      kept = sum(old_k.values())
      assert sum(new_k.values()) == kept - round(f * kept)
    w = new


@pytest.mark.parametrize('name', ['global_l1', 'layer_l1'])
def test_three_prunes_of_0_2_leave_0_8_cubed(name):
  crit = JIT[name]
  _, p = model_a_params()
  w = wm.init_weight_mask(p)
  sizes = {n: int(np.size(m)) for n, m in wm.named_leaves(w).items()}
  for _ in range(3):
    w = crit(p, w, fraction=0.2)
  n = total = sum(sizes.values())
  for _ in range(3):
    n -= round(0.2 * n)  # torch: round(amount * remaining), Python's round
  kept = wm.kept_counts(w)
  if name == 'global_l1':
    assert sum(kept.values()) == n
  else:
    for leaf, size in sizes.items():
      k = size
      for _ in range(3):
        k -= round(0.2 * k)
      assert kept[leaf] == k
  assert abs(sum(kept.values()) / total - 0.8 ** 3) <= 3 * len(sizes) / total


def test_global_l1_equals_a_float64_sort():
  """Global L1 keeps the same weights as ranking all |w| in float64 with numpy (no ties in these weights)."""
  _, p = model_a_params(seed=3)
  w = wm.init_weight_mask(p)
  names = wm.mask_names(w)
  leaves = wm.named_leaves(p)
  ref_mask = {n: np.ones(np.shape(leaves[n]), bool) for n in names}
  for f in (0.2, 0.2, 0.5):
    w = JIT['global_l1'](p, w, f, jax.random.PRNGKey(0))
    flat = np.concatenate([np.abs(np.asarray(leaves[n], np.float64)).ravel() for n in names])
    alive = np.concatenate([ref_mask[n].ravel() for n in names])
    idx = np.flatnonzero(alive)
    drop = idx[np.argsort(flat[idx], kind='stable')[:round(f * idx.size)]]
    alive[drop] = False
    offsets = np.cumsum([0] + [ref_mask[n].size for n in names])
    for i, n in enumerate(names):
      ref_mask[n] = alive[offsets[i]:offsets[i + 1]].reshape(ref_mask[n].shape)
      np.testing.assert_array_equal(np.asarray(wm.named_leaves(w)[n]) > 0, ref_mask[n], err_msg=n)


def test_prune_count_is_pythons_round():
  fractions = [0.05 * i for i in range(21)] + [0.07, 0.3, 0.7, 0.15, 0.35]
  r = jnp.arange(0, 400, dtype=jnp.int32)
  for f in fractions:
    got = np.asarray(jax.jit(lambda r, f=f: wc.prune_count(f, r))(r))
    np.testing.assert_array_equal(got, [round(f * int(x)) for x in r], err_msg=str(f))
  # Under vmap (batched trials) too.
  got = jax.vmap(lambda r: wc.prune_count(0.7, r))(r.reshape(20, 20))
  np.testing.assert_array_equal(np.asarray(got).ravel(), [round(0.7 * int(x)) for x in r])
  # 0.3 * 95 = 28.499999999999996 in float64: torch prunes 28; a traced float32 fraction gets 29.
  assert round(0.3 * 95) == 28 and int(wc.prune_count(0.3, jnp.int32(95))) == 28
  assert int(jax.jit(wc.prune_count)(jnp.float32(0.3), jnp.int32(95))) == 29
  with pytest.raises(TypeError):
    wc.prune_count(1, jnp.int32(5))
  with pytest.raises(ValueError):
    wc.prune_count(1.5, jnp.int32(5))


def test_ties_at_the_threshold():
  """Ten equal weights, prune 3: without a key the first three; with keys each weight about equally often."""
  p = {'Dense_0': {'kernel': jnp.full((2, 5), -0.5)}}
  w = wm.init_weight_mask(p)
  m = np.asarray(jax.jit(wc.layer_l1, static_argnums=2)(p, w, 0.3)['Dense_0']['kernel']).ravel()
  np.testing.assert_array_equal(m, [0, 0, 0, 1, 1, 1, 1, 1, 1, 1])
  keys = jax.random.split(jax.random.PRNGKey(0), 400)
  ms = jax.jit(jax.vmap(lambda k: wc.global_l1(p, w, 0.3, k)['Dense_0']['kernel']))(keys)
  ms = np.asarray(ms).reshape(400, 10)
  assert np.all(ms.sum(axis=1) == 7)
  pruned_rate = 1 - ms.mean(axis=0)
  assert np.all(np.abs(pruned_rate - 0.3) < 0.1), pruned_rate
  # A strictly smaller weight is always pruned before the tied ones.
  p2 = {'Dense_0': {'kernel': jnp.full((2, 5), -0.5).at[1, 4].set(0.1)}}
  ms2 = np.asarray(jax.jit(jax.vmap(lambda k: wc.global_l1(p2, w, 0.3, k)['Dense_0']['kernel']))(keys[:20]))
  assert np.all(ms2[:, 1, 4] == 0)


def test_criteria_under_jit_and_vmap_equal_one_at_a_time():
  _, p = model_a_params()
  w0 = wm.init_weight_mask(p)
  ws = [JIT['global_random'](p, w0, 0.5, jax.random.PRNGKey(i)) for i in range(3)]
  keys = jax.random.split(jax.random.PRNGKey(7), 3)
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *ws)
  for name in ('global_l1', 'layer_random'):
    crit = wc.WEIGHT_CRITERIA[name]
    batched = jax.jit(jax.vmap(crit, in_axes=(None, 0, None, 0)), static_argnums=2)(p, stacked, 0.2, keys)
    for i in range(3):
      one = JIT[name](p, ws[i], 0.2, keys[i])
      for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(batched)):
        np.testing.assert_array_equal(a, b[i], err_msg=name)
  # A traced fraction (float32 count) runs too and prunes round(f * kept) here.
  new = jax.jit(wc.layer_l1)(p, w0, jnp.float32(0.25), None)
  assert wm.kept_counts(new) == {n: k - round(0.25 * k) for n, k in wm.kept_counts(w0).items()}


def _train(model, params, opt_state, tx, wmask, steps, images, labels, masked: bool):
  node_masks = models.full_masks(model)

  def loss(p):
    logits, _ = model.apply({'params': wm.apply_weight_mask(p, wmask)}, images, node_masks)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  @jax.jit
  def step(params, opt_state):
    value, grads = jax.value_and_grad(loss)(params)
    if masked:
      updates, opt_state = tx.update(grads, opt_state, params, weight_mask=wmask)
    else:
      updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value

  losses = []
  for _ in range(steps):
    params, opt_state, value = step(params, opt_state)
    losses.append(float(value))
  return params, opt_state, losses


OPTIMISERS = {
    'sgd_momentum_wd': lambda: optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.05, momentum=0.9)),
    'adam': lambda: optax.adam(1e-3),
}


@pytest.mark.parametrize('opt', sorted(OPTIMISERS))
def test_pruned_weights_stay_exactly_zero_through_training(opt):
  """Dense steps build momentum / Adam moments; after a prune, 30 masked steps keep every pruned weight at 0.

  The pruned params are not zeroed before training and the optimiser state
  carries the dense phase's momentum: the strongest case. The negative
  control (the same optimiser unmasked, on masked params) revives them.
  """
  model, p = model_a_params()
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.integers(0, 256, (64, *IMAGE_SHAPE), dtype=np.uint8))
  labels = jnp.asarray(rng.integers(0, 10, 64), jnp.int32)
  inner = OPTIMISERS[opt]()
  tx = wm.masked_updates(inner)
  dense = wm.init_weight_mask(p)
  p, state, _ = _train(model, p, tx.init(p), tx, dense, 10, images, labels, masked=True)
  wmask = JIT['global_l1'](p, dense, 0.5)
  trained, _, losses = _train(model, p, state, tx, wmask, 30, images, labels, masked=True)
  assert losses[-1] < losses[0]
  for name, m in wm.named_leaves(wmask).items():
    w0, w1, m = np.asarray(wm.named_leaves(p)[name]), np.asarray(wm.named_leaves(trained)[name]), np.asarray(m)
    assert np.all(w1[m == 0] == 0.0), name
    assert np.mean(w1[m > 0] != w0[m > 0]) > 0.9, name  # the kept weights did train
  for name in ('Dense_0/bias', 'Dense_2/bias'):  # non-prunable leaves train normally
    assert np.any(wm.named_leaves(trained)[name] != wm.named_leaves(p)[name])
  # Negative control: plain updates from the masked params with the dense phase's state.
  revived, _, _ = _train(model, wm.apply_weight_mask(p, wmask), state, inner, wmask, 30, images, labels,
                         masked=False)
  pruned = np.concatenate([np.asarray(wm.named_leaves(revived)[n])[np.asarray(m) == 0]
                           for n, m in wm.named_leaves(wmask).items()])
  assert np.mean(pruned != 0) > 0.5


def test_criteria_inside_shard_map_lanes():
  """The batched driver's shape: trials split over a device mesh (shard_map), lanes run by lax.map."""
  from jax.sharding import Mesh, PartitionSpec as P
  _, p = model_a_params()
  w0 = wm.init_weight_mask(p)
  ws = jax.tree.map(lambda *x: jnp.stack(x), *[JIT['global_random'](p, w0, 0.5, jax.random.PRNGKey(i))
                                                  for i in range(2)])
  keys = jax.random.split(jax.random.PRNGKey(9), 2)
  mesh = Mesh(np.array(jax.devices()[:1]), ('trials',))
  lanes = lambda w, k: jax.lax.map(lambda wk: wc.layer_l1(p, wk[0], 0.2, wk[1]), (w, k))
  out = jax.jit(jax.shard_map(lanes, mesh=mesh, in_specs=(P('trials'), P('trials')), out_specs=P('trials')))(ws, keys)
  for i in range(2):
    one = JIT['layer_l1'](p, jax.tree.map(lambda x: x[i], ws), 0.2, keys[i])
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(one)):
      np.testing.assert_array_equal(a[i], b)
