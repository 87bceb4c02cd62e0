"""ResNet18 / VGG19: masks silence their filters (incl. projection shortcuts), shapes, smoke training."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dropnet_jax.models import large as L
from dropnet_jax import models

# Tiny versions: conv1 widths differ from the block widths (they are free), every width >= 2.
RESNET_WIDTHS = list(L.resnet18_widths((2, 3, 3, 4)))
for _i, _name in enumerate(L.resnet18_layer_names()):
  if _name.endswith('conv1'):
    RESNET_WIDTHS[_i] = 3
CASES = {
    'resnet18': L.ResNet18(widths=tuple(RESNET_WIDTHS), num_classes=5),
    'vgg19': L.VGG19(widths=(4, 5) * 8, num_classes=5),
}
SHAPE = (16, 16, 3)
DROP = 1  # unit 1 of every masked layer is dropped


LABELS = jnp.arange(8) % 5


def _loss(model, params, batch_stats, masks, images, labels, train):
  """Mean cross-entropy; aux = (logits, stats, new batch_stats). train=True updates BN's batch_stats."""
  v = {'params': params, **({'batch_stats': batch_stats} if batch_stats is not None else {})}
  if train and batch_stats is not None:
    (logits, stats), new = model.apply(v, images, masks, train=True, mutable=['batch_stats'])
    batch_stats = new['batch_stats']
  else:
    logits, stats = model.apply(v, images, masks, train=train)
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), (logits, stats, batch_stats)


# One compiled value-and-grad per (model, train), shared by all tests (compiles dominate the run time).
# ResNet18 ignores `train`, so it always uses the train=False program.
_COMPILED = {}


def loss_and_grad(name, train):
  train = train and name == 'vgg19'
  if (name, train) not in _COMPILED:
    model = CASES[name]
    _COMPILED[name, train] = jax.jit(jax.value_and_grad(
        lambda p, bs, m, x, y: _loss(model, p, bs, m, x, y, train), has_aux=True))
  return _COMPILED[name, train]


def forward(name, train, variables, masks, images):
  (_, (logits, stats, _)), _ = loss_and_grad(name, train)(
      variables['params'], variables.get('batch_stats'), masks, images, LABELS)
  return logits, stats


_SETUP = {}


def setup(name, seed=0):
  """Tiny model, its variables (VGG: running stats fitted to the data), 8 images, masks dropping unit DROP."""
  if (name, seed) not in _SETUP:
    model = CASES[name]
    # An 'rbg' key: XLA:CPU compiles a threefry-based init of ~20 convs very slowly (~20 s).
    key_p, key_x = jax.random.split(jax.random.key(seed, impl='rbg'))
    theta = models.init_params(model, key_p, SHAPE)
    variables = dict(theta) if 'batch_stats' in theta else {'params': theta}
    images = jax.random.randint(key_x, (8, *SHAPE), 0, 256).astype(jnp.uint8)
    if 'batch_stats' in variables:
      # Running stats near the data's batch statistics (not the init's 0/1), so train=False uses real ones.
      step = loss_and_grad(name, True)
      for _ in range(30):
        (_, (_, _, variables['batch_stats'])), _ = step(variables['params'], variables['batch_stats'],
                                                         models.full_masks(model), images, LABELS)
    _SETUP[name, seed] = (variables, images)
  model = CASES[name]
  variables, images = _SETUP[name, seed]
  masks = tuple(jnp.ones(w).at[DROP].set(0.) for w in model.widths)
  return model, dict(variables), images, masks


def get(tree, path):
  for p in path:
    tree = tree[p]
  return tree


def scramble(model, params):
  """Every param feeding a dropped unit (kernel[..., DROP], bias/scale[DROP]) set to junk."""
  params = jax.tree.map(lambda x: x, params)
  for paths in L.incoming_params(model):
    for path in paths:
      layer = get(params, path)
      for k in layer:
        layer[k] = layer[k].at[..., DROP].set(3.0 if k == 'kernel' else -2.0)
  return params


def test_full_size_shapes():
  for name, n_masks in [('resnet18', 20), ('vgg19', 16)]:
    for shape, classes in [((32, 32, 3), 10), ((64, 64, 3), 200)]:
      model = models.create_model(name, None, classes)
      assert len(model.widths) == n_masks == len(L.layer_names(model)) == len(L.incoming_params(model))
      theta = jax.eval_shape(lambda k: models.init_params(model, k, shape), jax.random.key(0))
      variables = theta if 'batch_stats' in theta else {'params': theta}
      logits, stats = jax.eval_shape(
          lambda v: model.apply(v, jnp.zeros((2, *shape), jnp.uint8), models.full_masks(model)), variables)
      assert logits.shape == (2, classes)
      assert [s.abs_mean.shape for s in stats] == [(2, w) for w in model.widths]
      assert ('batch_stats' in variables) == (name == 'vgg19')
  r = models.create_model('resnet18', None, 10)
  assert r.widths[:3] == (64, 64, 64) and r.widths[5:8] == (128, 128, 128) and r.widths[-1] == 512
  assert L.layer_names(r)[5:8] == ('block2/conv1', 'block2/shortcut', 'block2/out')
  assert models.create_model('vgg19', None, 10, width_multiplier=0.25).widths == tuple(
      w // 4 for w in L.VGG19_WIDTHS)
  assert models.create_model('resnet18', None, 10, width_multiplier=0.5).widths == L.resnet18_widths((32, 64, 128, 256))


def test_bad_widths_rejected():
  bad = list(L.resnet18_widths())
  bad[6] = 100  # block2 shortcut != block2 out
  with pytest.raises(ValueError):
    models.create_model('resnet18', bad, 10)
  bad = list(L.resnet18_widths())
  bad[2] = 32  # block0 out != stem (identity shortcut)
  with pytest.raises(ValueError):
    models.create_model('resnet18', bad, 10)
  with pytest.raises(ValueError):
    models.create_model('vgg19', (8,) * 15, 10)
  with pytest.raises(ValueError):
    models.create_model('alexnet', None, 10)


@pytest.mark.parametrize('train', [False, True])
@pytest.mark.parametrize('name', sorted(CASES))
def test_dropped_filter_changes_nothing_downstream(name, train):
  model, variables, images, masks = setup(name)

  def run(params, m):
    return forward(name, train, {**variables, 'params': params}, m, images)

  logits, stats = run(variables['params'], masks)
  assert len(stats) == len(model.widths)
  scrambled = scramble(model, variables['params'])
  logits2, stats2 = run(scrambled, masks)
  np.testing.assert_array_equal(np.asarray(logits), np.asarray(logits2))
  for s in (*stats, *stats2):
    np.testing.assert_array_equal(np.asarray(s.abs_mean[:, DROP]), 0.0)
    np.testing.assert_array_equal(np.asarray(s.zero_frac[:, DROP]), 1.0)
  # Each layer's scrambled slice alone matters with full masks (the test can fail), shortcuts included.
  full = models.full_masks(model)
  base = run(variables['params'], full)[0]
  for layer, paths in enumerate(L.incoming_params(model)):
    one = jax.tree.map(lambda x: x, variables['params'])
    layer_params = get(one, paths[0])
    layer_params['kernel'] = layer_params['kernel'].at[..., DROP].set(3.0)
    assert not np.allclose(base, run(one, full)[0]), L.layer_names(model)[layer]
    # ...and with that one layer's unit dropped, it does not.
    only = tuple(m.at[DROP].set(0.) if i == layer else m for i, m in enumerate(full))
    np.testing.assert_array_equal(np.asarray(run(variables['params'], only)[0]), np.asarray(run(one, only)[0]))


@pytest.mark.parametrize('name', sorted(CASES))
def test_dropped_filter_gets_zero_gradient(name):
  model, variables, images, masks = setup(name)
  _, grads = loss_and_grad(name, True)(variables['params'], variables.get('batch_stats'), masks, images, LABELS)
  checked = 0
  for paths in L.incoming_params(model):
    for path in paths:
      for k, g in get(grads, path).items():
        np.testing.assert_array_equal(np.asarray(g[..., DROP]), 0.0, err_msg=f'{path} {k}')
        checked += 1
    kernel = np.asarray(get(grads, paths[0])['kernel'])
    assert np.abs(kernel[..., 0]).sum() > 0  # kept filters do learn
  assert checked >= len(model.widths)


@pytest.mark.parametrize('name', sorted(CASES))
def test_smoke_training_reduces_loss(name):
  model, variables, images, masks = setup(name)
  tx = optax.sgd(0.03 if name == 'vgg19' else 0.3, momentum=0.9)
  grad_fn = loss_and_grad(name, True)  # VGG: train mode, batch_stats updated

  @jax.jit
  def apply_grads(params, grads, opt_state):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  params, batch_stats = variables['params'], variables.get('batch_stats')
  opt_state = tx.init(params)
  losses = []
  for _ in range(15):
    (loss, (_, _, batch_stats)), grads = grad_fn(params, batch_stats, masks, images, LABELS)
    params, opt_state = apply_grads(params, grads, opt_state)
    losses.append(float(loss))
  assert np.isfinite(losses).all()
  # Tiny widths (2-5 filters) learn slowly; a clear, steady decrease is what is checked.
  assert losses[-1] < 0.9 * losses[0] and np.mean(losses[-3:]) < np.mean(losses[:3]), losses
  if batch_stats is not None:  # running statistics were updated
    assert not np.allclose(batch_stats['bn0']['mean'], variables['batch_stats']['bn0']['mean'])
