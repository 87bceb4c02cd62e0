"""compact: the compact network computes the masked network's logits, for all five models.

Random parameters (biases and batch-norm statistics too, so every sliced array
matters), random masks, and the structural corner cases: members of a residual
group keeping different channels, an empty conv1 or projection shortcut inside
a ResNet (zero-width layers), a whole layer or residual group dropped (the
network becomes constant). Save/load and the torch twin reproduce the logits.
"""

from __future__ import annotations

import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dropnet_jax import theta as theta_lib
from dropnet_jax import models

from dropnet_jax.compaction import compact
from dropnet_jax.models import large as L
from dropnet_jax.models.compact import CompactResNet18, ConstantModel

NUM_CLASSES = 7
CASES = {  # width multiplier ~1/8 for the large models, CIFAR-size inputs
    'fc': ((12, 9), (8, 8, 1)),
    'conv': ((6, 5), (12, 12, 1)),
    'modelc': ((4, 5, 6, 3), (12, 12, 3)),
    'resnet18': (L.resnet18_widths((8, 16, 32, 64)), (32, 32, 3)),
    'vgg19': (tuple(w // 8 for w in L.VGG19_WIDTHS), (32, 32, 3)),
}
RESNET_INDEX = {n: i for i, n in enumerate(L.resnet18_layer_names())}


def random_theta(model, image_shape, seed=0):
  """θ in init_params' form with random values: kernels ~N(0, 1.2/fan_in), nonzero biases, BN stats."""
  shapes = jax.eval_shape(lambda: models.init_params(model, jax.random.key(0), image_shape))
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name, shape = path[-1].key, leaf.shape
    if name == 'kernel':
      return rng.normal(0, 1.2 / np.sqrt(np.prod(shape[:-1])), shape)
    if name in ('scale', 'var'):
      return rng.uniform(0.5, 1.5, shape)
    return rng.normal(0.05, 0.2, shape)  # bias, BN bias and running mean

  return jax.tree_util.tree_map_with_path(lambda p, s: jnp.asarray(draw(p, s), jnp.float32), shapes)


def random_masks(widths, rng, keep):
  """Independent 0/1 masks keeping ~`keep` of each layer, never emptying one."""
  out = []
  for w in widths:
    m = rng.random(w) < keep
    m[rng.integers(w)] = True
    out.append(m.astype(np.float32))
  return out


def case_masks(name, case):
  widths, _ = CASES[name]
  rng = np.random.default_rng(zlib.crc32(f'{name}/{case}'.encode()))  # stable across processes
  if case == 'full':
    return [np.ones(w, np.float32) for w in widths]
  if case in ('keep60', 'keep25'):
    return random_masks(widths, rng, 0.6 if case == 'keep60' else 0.25)
  masks = random_masks(widths, rng, 0.6)
  if case == 'empty_layer':  # chains: one layer loses every unit
    masks[len(widths) // 2] *= 0
  elif case == 'empty_first_and_last':
    masks[0] *= 0
    masks[-1] *= 0
  elif case == 'group0_dropped':  # the first residual stream group: stem, block0/out, block1/out
    for n in ('stem', 'block0/out', 'block1/out'):
      masks[RESNET_INDEX[n]] *= 0
  elif case == 'group2_dropped':
    for n in ('block4/shortcut', 'block4/out', 'block5/out'):
      masks[RESNET_INDEX[n]] *= 0
  elif case == 'zero_width_layers':  # empty conv1s and a projection shortcut: the stream survives
    for n in ('block1/conv1', 'block2/shortcut', 'block3/conv1', 'block7/conv1'):
      masks[RESNET_INDEX[n]] *= 0
  elif case == 'disjoint_members':  # the members of group 0 keep different channels
    masks = [np.ones(w, np.float32) for w in widths]
    masks[RESNET_INDEX['stem']][1::2] = 0
    masks[RESNET_INDEX['block0/out']][0::2] = 0
    masks[RESNET_INDEX['block1/out']][:3] = 0
    masks[RESNET_INDEX['block2/shortcut']][::3] = 0  # and the projection shortcut drops others than its out
    masks[RESNET_INDEX['block2/out']][1::3] = 0
  else:
    raise ValueError(case)
  return masks


CONSTANT_CASES = {'empty_layer', 'empty_first_and_last', 'group0_dropped', 'group2_dropped'}
EXACT = [(n, c) for n in ('fc', 'conv', 'modelc') for c in ('full', 'keep60', 'keep25', 'empty_layer')]
EXACT += [('fc', 'empty_first_and_last')]
# The large models compile slowly: fewer cases (full masks: test_full_masks_change_nothing).
EXACT += [('vgg19', c) for c in ('keep25', 'empty_layer')]
EXACT += [('resnet18', c) for c in ('keep25', 'group0_dropped', 'group2_dropped', 'zero_width_layers',
                                    'disjoint_members')]


@functools.lru_cache(maxsize=None)
def setup(name):
  widths, shape = CASES[name]
  model = models.create_model(name, widths, NUM_CLASSES)
  theta = random_theta(model, shape)
  images = jnp.asarray(np.random.default_rng(1).integers(0, 256, (6, *shape)), jnp.uint8)
  return model, theta, images


@functools.lru_cache(maxsize=None)
def forward(model):
  return jax.jit(lambda v, x, m: model.apply(v, x, m, train=False))


def run(model, theta, images, masks=None):
  masks = models.full_masks(model) if masks is None else tuple(jnp.asarray(m) for m in masks)
  logits, stats = forward(model)(theta_lib.variables(theta), images, masks)
  return np.asarray(logits, np.float64), stats


@pytest.mark.parametrize('name,case', EXACT)
def test_compact_logits_equal_masked_logits(name, case):
  model, theta, images = setup(name)
  masks = case_masks(name, case)
  small, small_theta = compact.compact(model, theta, masks, image_shape=CASES[name][1])
  want, want_stats = run(model, theta, images, masks)
  got, got_stats = run(small, small_theta, images)
  assert np.abs(want).max() > 0.05  # nontrivial logits, so the tolerance means something
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
  assert (case in CONSTANT_CASES) == isinstance(small, ConstantModel)
  if isinstance(small, ConstantModel):
    assert jax.tree.leaves(theta_lib.split(small_theta)[0])[0].shape == (NUM_CLASSES,)
    return
  # Every unit the compact network keeps has the statistics of the same unit in the masked network.
  live = compact.plan(model, masks).live
  for s_small, s_full, idx in zip(got_stats, want_stats, live, strict=True):
    np.testing.assert_allclose(np.asarray(s_small.abs_mean), np.asarray(s_full.abs_mean)[:, idx], atol=1e-5)
    np.testing.assert_array_equal(np.asarray(s_small.zero_frac), np.asarray(s_full.zero_frac)[:, idx])
  if name == 'resnet18':
    assert isinstance(small, CompactResNet18)
    if case == 'zero_width_layers':
      assert min(small.widths) == 0
    if case == 'disjoint_members':  # output channels the shortcut lacks are gathered as zeros
      assert any(i < 0 for idx in small.shortcut_index for i in idx)
  else:  # a chain keeps exactly the kept units, in the same class
    assert type(small) is type(model)
    assert small.widths == tuple(int(m.sum()) for m in masks)


def test_full_masks_change_nothing():
  for name in CASES:
    model, theta, images = setup(name)
    small, small_theta = compact.compact(model, theta, models.full_masks(model))
    assert small.widths == model.widths
    same = jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), theta_lib.variables(theta), theta_lib.variables(small_theta))
    assert all(jax.tree.leaves(same))
    if name == 'resnet18':  # identity index maps: the library's ResNet18 runs the compact params as they are
      assert all(idx == tuple(range(len(idx))) for idx in small.shortcut_index)
      np.testing.assert_array_equal(run(model, small_theta, images)[0], run(small, small_theta, images)[0])


def test_theta_form_is_kept():
  model, theta, _ = setup('fc')
  masks = case_masks('fc', 'keep60')
  _, bare = compact.compact(model, theta, masks)
  _, wrapped = compact.compact(model, {'params': theta}, masks)
  assert set(bare) == {f'Dense_{i}' for i in range(3)} and set(wrapped) == {'params'}
  model, theta, _ = setup('vgg19')
  _, small_theta = compact.compact(model, theta, case_masks('vgg19', 'keep60'))
  assert set(small_theta) == {'params', 'batch_stats'}


def test_errors():
  model, theta, _ = setup('conv')
  with pytest.raises(ValueError, match='image_shape'):
    compact.compact(model, theta, case_masks('conv', 'empty_layer'))  # constant output needs the input shape
  with pytest.raises(ValueError, match='do not match'):
    compact.compact(model, theta, [np.ones(3, np.float32), np.ones(5, np.float32)])


@pytest.mark.parametrize('name,case', [('fc', 'keep60'), ('modelc', 'keep25'), ('vgg19', 'keep25'),
                                       ('resnet18', 'zero_width_layers'), ('conv', 'empty_layer')])
def test_save_load_roundtrip(tmp_path, name, case):
  model, theta, images = setup(name)
  shape = CASES[name][1]
  small, small_theta = compact.compact(model, theta, case_masks(name, case), image_shape=shape)
  compact.save(str(tmp_path / 'export'), small, small_theta, {'cycle': 3, 'metric': 'min'}, image_shape=shape)
  loaded, loaded_theta, spec = compact.load(str(tmp_path / 'export'))
  assert loaded == small
  assert spec['meta'] == {'cycle': 3, 'metric': 'min'} and spec['image_shape'] == list(shape)
  assert spec['widths'] == list(small.widths) and spec['num_classes'] == NUM_CLASSES
  same = jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), theta_lib.variables(small_theta),
                      theta_lib.variables(loaded_theta))
  assert all(jax.tree.leaves(same))
  np.testing.assert_array_equal(np.asarray(compact.predict(loaded, loaded_theta, images)),
                                np.asarray(compact.predict(small, small_theta, images)))


@pytest.mark.parametrize('name,case', [('fc', 'keep25'), ('conv', 'keep60'), ('modelc', 'keep60'),
                                       ('modelc', 'empty_layer')])
def test_torch_twin_of_compact_model(tmp_path, name, case):
  torch = pytest.importorskip('torch')
  from tests.torch_reference import compact as tcompact
  from tests.torch_reference import models as tmodels
  model, theta, images = setup(name)
  shape = CASES[name][1]
  masks = case_masks(name, case)
  small, small_theta = compact.compact(model, theta, masks, image_shape=shape)
  diff = tcompact.export(str(tmp_path), small, small_theta, shape)
  assert diff <= 1e-5
  twin = tcompact.load_torch(str(tmp_path))
  with torch.no_grad():
    got, _ = twin(torch.from_numpy(np.array(images)), tmodels.full_masks(twin), with_stats=False)
  np.testing.assert_allclose(got.detach().double().numpy(), run(model, theta, images, masks)[0], rtol=0, atol=1e-5)
  if not isinstance(small, ConstantModel):
    assert sum(p.numel() for p in twin.parameters()) == sum(a.size for a in jax.tree.leaves(small_theta))
