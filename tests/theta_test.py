"""theta: the two forms of θ (a params tree; a variables dict with batch_stats), round trips, and apply."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dropnet_jax import models
from dropnet_jax import theta as T

FC_SHAPE = (6, 6, 1)
VGG_SHAPE = (16, 16, 3)


@pytest.fixture(scope='module')
def fc():
  model = models.create_model('fc', (5, 4), 3)
  return model, models.init_params(model, jax.random.key(0), FC_SHAPE)


@pytest.fixture(scope='module')
def vgg():
  model = models.create_model('vgg19', None, 10, 0.125)
  return model, models.init_params(model, jax.random.key(1), VGG_SHAPE)


def _images(shape, n=4, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, 256, (n, *shape)), jnp.uint8)


def _same(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  assert all(x is y for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_plain_params(fc):
  _, theta = fc
  assert not T.is_variables(theta)
  assert 'params' not in theta
  params, stats = T.split(theta)
  assert params is theta and stats is None
  assert T.params(theta) is theta and T.batch_stats(theta) is None and not T.has_batch_stats(theta)
  v = T.variables(theta)
  assert set(v) == {'params'} and v['params'] is theta
  new = jax.tree.map(lambda a: a + 1, theta)
  assert T.join(theta, new) is new
  assert T.join(theta, new, None) is new
  assert T.replace_params(theta, new) is new
  assert T.normalise(theta) is theta
  assert T.join(theta, *T.split(theta)) is theta  # round trip


def test_variables_dict_with_batch_stats(vgg):
  _, theta = vgg
  assert set(theta) == {'params', 'batch_stats'}
  assert T.is_variables(theta) and T.has_batch_stats(theta)
  params, stats = T.split(theta)
  assert params is theta['params'] and stats is theta['batch_stats']
  assert T.params(theta) is params and T.batch_stats(theta) is stats
  v = T.variables(theta)
  assert type(v) is dict and set(v) == {'params', 'batch_stats'}
  _same(v, theta)
  _same(T.variables_from(params, stats), theta)
  _same(T.join(theta, *T.split(theta)), theta)  # round trip
  _same(T.normalise(theta), theta)

  new_params = jax.tree.map(lambda a: a * 2, params)
  replaced = T.replace_params(theta, new_params)
  assert replaced['params'] is new_params and replaced['batch_stats'] is stats
  assert T.replace_params(replaced, params)['params'] is params
  new_stats = jax.tree.map(lambda a: a + 1, stats)
  joined = T.join(theta, new_params, new_stats)
  assert joined['params'] is new_params and joined['batch_stats'] is new_stats
  assert set(T.join(theta, new_params)) == {'params'}  # statistics left out (e.g. a compact network)


def test_params_only_variables_dict(fc):
  _, params = fc
  theta = {'params': params}
  assert T.is_variables(theta) and not T.has_batch_stats(theta)
  assert T.params(theta) is params
  assert set(T.variables(theta)) == {'params'} and T.variables(theta)['params'] is params
  new = jax.tree.map(lambda a: a + 1, params)
  assert set(T.replace_params(theta, new)) == {'params'} and T.replace_params(theta, new)['params'] is new


def test_frozen_dict_and_lookalikes(vgg):
  _, theta = vgg
  frozen = flax.core.freeze(theta)
  assert T.is_variables(frozen)
  normal = T.normalise(frozen)
  assert type(normal) is dict and set(normal) == {'params', 'batch_stats'}
  assert type(T.variables(frozen)) is dict  # the outer container only: the collections stay as they are
  assert all(a is b for a, b in zip(jax.tree.leaves(T.variables(frozen)), jax.tree.leaves(theta)))
  # A params tree is never a variables dict, even beside a 'params' key of another collection.
  assert not T.is_variables({'params': {}, 'cache': {}})
  assert not T.is_variables({'batch_stats': {}})
  assert not T.is_variables({'Dense_0': {'kernel': np.zeros((2, 2))}})
  assert not T.is_variables(np.zeros(3))


def test_apply_logits_unchanged(fc, vgg):
  """model.apply through theta.variables gives the logits of the dicts the code used to build by hand."""
  model, theta = fc
  x = _images(FC_SHAPE)
  masks = models.full_masks(model)
  want, _ = model.apply({'params': theta}, x, masks)
  got, _ = model.apply(T.variables(theta), x, masks)
  np.testing.assert_array_equal(got, want)

  model, theta = vgg
  x = _images(VGG_SHAPE)
  masks = models.full_masks(model)
  forward = jax.jit(lambda v, x: model.apply(v, x, masks, train=False)[0])
  want = forward({'params': theta['params'], 'batch_stats': theta['batch_stats']}, x)
  np.testing.assert_array_equal(forward(T.variables(theta), x), want)
  # Inside a trace too (only the keys are looked at), and the running statistics are really used.
  np.testing.assert_array_equal(jax.jit(lambda t, x: forward(T.variables(t), x))(theta, x), want)
  shifted = T.join(theta, T.params(theta), jax.tree.map(lambda a: a + 3.0, T.batch_stats(theta)))
  assert not np.allclose(forward(T.variables(shifted), x), want)
