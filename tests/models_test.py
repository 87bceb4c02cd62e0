"""Masked models: masking really silences units, and the statistics are right."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dropnet_jax import models

CASES = {
    'fc': (models.MLP(widths=(5, 4), num_classes=3), (6, 6, 1)),
    'conv': (models.ConvNet(widths=(4, 3), num_classes=3), (8, 8, 1)),
    'modelc': (models.ModelC(widths=(3, 3, 4, 4), head=(6,), num_classes=3), (8, 8, 3)),
}


def setup(name, seed=0):
  model, shape = CASES[name]
  key_p, key_x = jax.random.split(jax.random.key(seed))
  params = models.init_params(model, key_p, shape)
  images = jax.random.randint(key_x, (5, *shape), 0, 256).astype(jnp.uint8)
  # Drop unit 1 of every masked layer.
  masks = tuple(jnp.ones(w).at[1].set(0.) for w in model.widths)
  return model, params, images, masks


def masked_layer_params(model, params):
  """The param dict of each masked layer, in mask order."""
  prefix = 'Dense' if isinstance(model, models.MLP) else 'Conv'
  return [params[f'{prefix}_{i}'] for i in range(len(model.widths))]


@pytest.mark.parametrize('name', sorted(CASES))
def test_dropped_unit_changes_nothing_downstream(name):
  model, params, images, masks = setup(name)
  logits, stats = model.apply({'params': params}, images, masks)
  # Scramble everything that feeds the dropped units: their kernel slices and biases.
  scrambled = jax.tree.map(lambda x: x, params)
  for layer in masked_layer_params(model, scrambled):
    layer['kernel'] = layer['kernel'].at[..., 1].set(123.0)
    layer['bias'] = layer['bias'].at[1].set(-7.0)
  logits2, stats2 = model.apply({'params': scrambled}, images, masks)
  np.testing.assert_array_equal(np.asarray(logits), np.asarray(logits2))
  for s in stats2:
    np.testing.assert_array_equal(np.asarray(s.abs_mean[:, 1]), 0.0)
    np.testing.assert_array_equal(np.asarray(s.zero_frac[:, 1]), 1.0)
  # ...and the same change with full masks does change the logits (the test can fail).
  full = models.full_masks(model)
  assert not np.allclose(model.apply({'params': params}, images, full)[0],
                         model.apply({'params': scrambled}, images, full)[0])


@pytest.mark.parametrize('name', sorted(CASES))
def test_dropped_unit_gets_zero_gradient(name):
  model, params, images, masks = setup(name)
  labels = jnp.arange(images.shape[0]) % 3

  def loss(p):
    logits, _ = model.apply({'params': p}, images, masks)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  grads = jax.grad(loss)(params)
  for g in masked_layer_params(model, grads):
    np.testing.assert_array_equal(np.asarray(g['kernel'][..., 1]), 0.0)
    np.testing.assert_array_equal(np.asarray(g['bias'][1]), 0.0)
    assert np.abs(np.asarray(g['kernel'][..., 0])).sum() > 0  # kept units do learn


def test_mlp_stats_match_float64_reference():
  model, params, images, masks = setup('fc')
  logits, stats = model.apply({'params': params}, images, masks)
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  x = np.asarray(images, np.float64).reshape(5, -1) / 255
  want = []
  for i, m in enumerate(masks):
    x = np.maximum(x @ p[f'Dense_{i}']['kernel'] + p[f'Dense_{i}']['bias'], 0) * np.asarray(m)
    want.append(x)
  ref_logits = x @ p['Dense_2']['kernel'] + p['Dense_2']['bias']
  np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-6)
  for s, a in zip(stats, want):
    np.testing.assert_allclose(s.abs_mean, np.abs(a), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(s.zero_frac, (a == 0).astype(np.float32))


def conv3x3_same(x, kernel, bias):
  """Float64 reference 3x3 'SAME' convolution of NHWC x with an HWIO kernel."""
  n, h, w, _ = x.shape
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  out = np.zeros((n, h, w, kernel.shape[-1]))
  for i in range(h):
    for j in range(w):
      out[:, i, j, :] = np.einsum('nabc,abco->no', xp[:, i:i + 3, j:j + 3, :], kernel)
  return out + bias


def test_conv_filter_stats_are_spatial_means_float64():
  model, params, images, masks = setup('conv')
  _, stats = model.apply({'params': params}, images, masks)
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  a = np.maximum(conv3x3_same(np.asarray(images, np.float64) / 255, p['Conv_0']['kernel'], p['Conv_0']['bias']), 0)
  a = a * np.asarray(masks[0])
  np.testing.assert_allclose(stats[0].abs_mean, np.abs(a).mean(axis=(1, 2)), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(stats[0].zero_frac, (a == 0).mean(axis=(1, 2)), rtol=1e-6)


def test_create_model_validates():
  assert models.create_model('fc', None, 10).widths == (40, 40)
  assert models.create_model('conv', (64, 32), 10).widths == (64, 32)
  assert models.create_model('conv', (32, 64), 10).widths == (32, 64)
  with pytest.raises(ValueError, match='unknown model'):
    models.create_model('resnet7', None, 10)
  with pytest.raises(ValueError, match='positive integers'):
    models.create_model('fc', (40, 0), 10)


def test_init_params_is_deterministic_per_key():
  model, shape = CASES['fc']
  a = models.init_params(model, jax.random.key(1), shape)
  b = models.init_params(model, jax.random.key(1), shape)
  c = models.init_params(model, jax.random.key(2), shape)
  chex.assert_trees_all_equal(a, b)
  with pytest.raises(AssertionError):
    chex.assert_trees_all_equal(a, c)
