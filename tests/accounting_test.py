"""accounting: hand-worked counts, counts of real arrays, gradients, and XLA's cost analysis.

* Model A FC40-FC40 on MNIST and a tiny conv net, dense and masked, worked by hand.
* Dense counts equal the number of entries init_params creates; compact counts
  equal the entries of the compacted θ (all five models).
* Effective (masked) params equal the parameters with a nonzero gradient in
  the masked network when every weight and input is positive (so every ReLU
  is active and a weight has zero gradient exactly when it cannot reach the
  logits): an independent check of what compaction keeps.
* Every layer's MAC formula equals XLA's flop count of that conv/dot alone
  (2 per valid MAC), and the whole compiled forward pass lies between
  2 * macs_valid and 2 * macs_valid + 8 flops per produced element.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from dropnet_jax import theta as theta_lib
from dropnet_jax import models

from dropnet_jax.compaction import accounting

from dropnet_jax.compaction import compact
from dropnet_jax.models.compact import ConstantModel
from compact_test import CASES, NUM_CLASSES, case_masks, setup  # noqa: E402  (shared fixtures of the compact tests)


def test_model_a_by_hand():
  model = models.create_model('fc', (40, 40), 10)
  dense = accounting.count(model, (28, 28, 1))
  assert [l.params for l in dense.layers] == [784 * 40 + 40, 40 * 40 + 40, 40 * 10 + 10]
  assert (dense.params, dense.macs, dense.macs_valid) == (33450, 33360, 33360)
  assert accounting.format_table(dense).splitlines()[-1].split()[1:] == ['33,450', '33,360']
  masks = [np.zeros(40, np.float32), np.zeros(40, np.float32)]
  masks[0][:10] = 1
  masks[1][5:10] = 1
  eff = accounting.masked_counts(model, (28, 28, 1), masks)
  assert [l.params for l in eff.layers] == [784 * 10 + 10, 10 * 5 + 5, 5 * 10 + 10]
  assert (eff.params, eff.macs) == (7965, 7940)
  s = accounting.summary(model, (28, 28, 1), masks)
  assert s['params'] == 7965 and s['dense_macs'] == 33360 and s['macs_ratio'] == pytest.approx(7940 / 33360)


def test_tiny_conv_by_hand():
  model = models.create_model('conv', (2, 3), 5)  # 4x4x1 -> conv 2 -> pool 2x2 -> conv 3 -> pool 1x1 -> dense 5
  c = accounting.count(model, (4, 4, 1))
  assert [l.params for l in c.layers] == [9 * 2 + 2, 9 * 2 * 3 + 3, 3 * 5 + 5]
  assert [l.macs for l in c.layers] == [4 * 4 * 9 * 2, 2 * 2 * 9 * 2 * 3, 15]
  # Taps on the zero padding: per axis 2+3+3+2 = 10 of 12 valid on the 4-wide map, 2+2 of 6 on the 2-wide one.
  assert [l.macs_valid for l in c.layers] == [10 * 10 * 2, 4 * 4 * 6, 15]
  assert (c.params, c.macs, c.macs_valid) == (97, 519, 311)
  eff = accounting.masked_counts(model, (4, 4, 1), [np.array([0, 1], np.float32), np.array([1, 0, 1], np.float32)])
  assert [l.params for l in eff.layers] == [9 + 1, 9 * 2 + 2, 2 * 5 + 5]
  assert eff.macs == 4 * 4 * 9 + 2 * 2 * 9 * 2 + 10


def n_entries(tree):
  return sum(int(np.prod(np.shape(a))) for a in jax.tree.leaves(tree))


@pytest.mark.parametrize('name', list(CASES))
def test_counts_equal_array_sizes(name):
  model, theta, _ = setup(name)
  shape = CASES[name][1]
  params, stats = theta_lib.split(theta)
  dense = accounting.count(model, shape)
  assert dense.params == n_entries(params) and dense.batch_stats == n_entries(stats)
  for case in ('keep60', 'keep25', 'empty_layer' if name != 'resnet18' else 'zero_width_layers'):
    masks = case_masks(name, case)
    small, small_theta = compact.compact(model, theta, masks, image_shape=shape)
    small_params, small_stats = theta_lib.split(small_theta)
    eff = accounting.masked_counts(model, shape, masks)
    assert eff == accounting.count(small, shape)
    assert eff.params == n_entries(small_params) and eff.batch_stats == n_entries(small_stats)
    assert eff.params < dense.params and eff.macs <= dense.macs
    if isinstance(small, ConstantModel):
      assert (eff.params, eff.macs) == (NUM_CLASSES, 0)


def positive_theta(theta, seed=0):
  """All weights positive (kernels ~ U(0.2, 1)/fan_in, biases U(0.1, 0.5)); BN mean 0, var 1, positive affine."""
  rng = np.random.default_rng(seed)

  def draw(path, a):
    name, shape = path[-1].key, np.shape(a)
    if name == 'kernel':
      return rng.uniform(0.2, 1.0, shape) / max(int(np.prod(shape[:-1])), 1)
    return {'mean': np.zeros(shape), 'var': np.ones(shape)}.get(name, rng.uniform(0.1, 0.5, shape))

  return jax.tree_util.tree_map_with_path(lambda p, a: jnp.asarray(draw(p, a), jnp.float32), theta)


@pytest.mark.parametrize('name,case', [(n, 'keep25') for n in CASES if n != 'resnet18'] + [
    ('resnet18', 'zero_width_layers'), ('resnet18', 'disjoint_members')])
def test_effective_params_are_those_with_gradient(name, case):
  model, theta, _ = setup(name)
  shape = CASES[name][1]
  params, stats = theta_lib.split(positive_theta(theta))
  images = jnp.asarray(np.random.default_rng(2).integers(1, 256, (8, *shape)), jnp.uint8)  # positive pixels
  masks = tuple(jnp.asarray(m) for m in case_masks(name, case))
  extra = {'batch_stats': stats} if stats is not None else {}

  def objective(p):
    logits, unit_stats = model.apply({'params': p, **extra}, images, masks, train=False)
    if name in ('fc', 'resnet18'):
      return logits.sum()
    # A max-pool passes gradient only to each window's maximum, so a conv's kernel taps used only at
    # positions that never win would look dead; the layers' own mean |activation| reaches every position.
    # (In a chain every kept unit is live, so this adds no unit the logits do not read.)
    return logits.sum() + sum(s.abs_mean.sum() for s in unit_stats)

  grads = jax.jit(jax.grad(objective))(params)
  nonzero = sum(int((np.asarray(g) != 0).sum()) for g in jax.tree.leaves(grads))
  eff = accounting.masked_counts(model, shape, masks)
  # Kernel taps that only ever meet zero padding (3x3 convs on VGG's 1x1 maps) are counted as params
  # (they are in the arrays) but can have no gradient.
  padding_only = sum((l.kernel**2 - _taps_used(l)) * l.in_features * l.out_features
                     for l in eff.layers if l.kind == 'conv')
  assert nonzero == eff.params - padding_only


def _taps_used(layer):
  """Kernel taps (of kernel**2) that meet the input at some output position."""
  def axis(n, out):
    return sum(any(0 <= o * layer.stride + t - layer.padding < n for o in range(out)) for t in range(layer.kernel))
  return axis(layer.in_hw[0], layer.out_hw[0]) * axis(layer.in_hw[1], layer.out_hw[1])


def _op_flops(layer):
  """XLA's flops for this layer's conv or dot alone (no bias)."""
  if layer.kind == 'dense':
    f = lambda x, w: x @ w
    args = (jax.ShapeDtypeStruct((1, layer.in_features), jnp.float32),
            jax.ShapeDtypeStruct((layer.in_features, layer.out_features), jnp.float32))
  else:
    pad = ((layer.padding, layer.padding),) * 2
    f = lambda x, w: lax.conv_general_dilated(x, w, (layer.stride,) * 2, pad,
                                              dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    args = (jax.ShapeDtypeStruct((1, *layer.in_hw, layer.in_features), jnp.float32),
            jax.ShapeDtypeStruct((layer.kernel, layer.kernel, layer.in_features, layer.out_features), jnp.float32))
  cost = jax.jit(f).lower(*args).compile().cost_analysis()
  return float((cost[0] if isinstance(cost, (list, tuple)) else cost).get('flops', 0.0))


@pytest.mark.parametrize('name', list(CASES))
def test_xla_cost_analysis(name):
  model, theta, _ = setup(name)
  shape = CASES[name][1]
  masks = case_masks(name, 'zero_width_layers' if name == 'resnet18' else 'keep25')
  small, small_theta = compact.compact(model, theta, masks, image_shape=shape)
  counts = accounting.count(small, shape)
  for layer in counts.layers:  # each layer's formula, exactly
    if layer.kind in ('dense', 'conv'):
      assert _op_flops(layer) == 2 * layer.macs_valid, layer
  for m, th, c in ((small, small_theta, counts), (model, theta, accounting.count(model, shape))):
    # Elementwise work (scaling, bias, ReLU, mask, pooling, batch norm) costs a few flops per element produced.
    elements = int(np.prod(shape)) + sum(l.out_hw[0] * l.out_hw[1] * l.out_features for l in c.layers)
    flops = accounting.xla_flops(m, th, None, shape)
    assert 2 * c.macs_valid <= flops <= 2 * c.macs_valid + 8 * elements
  # Masks save XLA nothing: the masked network costs the dense one.
  assert accounting.xla_flops(model, theta, masks, shape) == accounting.xla_flops(model, theta, None, shape)
