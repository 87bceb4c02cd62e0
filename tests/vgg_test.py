"""VGG16/VGG19 with a classifier head: the torch twin, compaction, accounting, Torch-Pruning, criteria.

The head's hidden FC layers are masked layers (nodes), so every check runs with
random masks on the convs *and* the head. The reference is the PyTorch twin
(tests/torch_reference/models.py: conv -> BatchNorm2d -> ReLU -> mask, same
weights and running statistics) and Torch-Pruning's dependency graph; Model C's
configurable head is checked against its twin too. Width multiplier 1/8,
32x32 inputs, so every test takes seconds.
"""

from __future__ import annotations

import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch')

import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from dropnet_jax import models  # noqa: E402
from dropnet_jax import theta as theta_lib  # noqa: E402
from dropnet_jax.compaction import accounting, compact  # noqa: E402
from dropnet_jax.models import large as L  # noqa: E402
from dropnet_jax.models import vgg as V  # noqa: E402
from dropnet_jax.models.compact import ConstantModel, model_from_spec, spec_of  # noqa: E402
from dropnet_jax.pruning import criteria, weight_masks  # noqa: E402
from dropnet_jax.models.layers import StatSums  # noqa: E402
from tests.torch_reference import compact as tcompact  # noqa: E402
from tests.torch_reference import models as tmodels  # noqa: E402
from tests.torch_reference.weights import load_flax_params, to_flax_params  # noqa: E402
from compact_test import random_theta, run  # noqa: E402

pytestmark = pytest.mark.usefixtures('one_torch_thread')

SHAPE = (32, 32, 3)
NUM_CLASSES = 7
CASES = {  # name: (--model, head, dropout); conv widths are the defaults / 8
    'vgg16_head': ('vgg16', (24, 12), 0.0),
    'vgg19_head': ('vgg19', (16,), 0.3),  # dropout: eval mode must ignore it
    'vgg19': ('vgg19', (), 0.0),
}


@functools.lru_cache(maxsize=None)
def setup(case):
  name, head, rate = CASES[case]
  model = models.create_model(name, None, NUM_CLASSES, 0.125, head=head, dropout=rate)
  theta = random_theta(model, SHAPE, seed=zlib.crc32(case.encode()))
  images = jnp.asarray(np.random.default_rng(1).integers(0, 256, (6, *SHAPE)), jnp.uint8)
  return model, theta, images


def case_masks(model, keep, seed=0):
  rng = np.random.default_rng(seed)
  out = []
  for w in model.widths:
    m = (rng.random(w) < keep).astype(np.float32)
    m[rng.integers(w)] = 1
    out.append(m)
  return out


def twin_of(model, theta):
  return load_flax_params(tmodels.create_model(spec_of(model)['model'], model.widths, NUM_CLASSES, SHAPE), theta)


# -- the models ---------------------------------------------------------------------------------------


def test_conv_plans_and_widths():
  assert len(V.VGG16_WIDTHS) == 13 and len(V.VGG19_WIDTHS) == 16
  for plan, pools in ((V.VGG16_WIDTHS, V.VGG16_POOL_AFTER), (V.VGG19_WIDTHS, V.VGG19_POOL_AFTER)):
    stages = np.split(np.array(plan), np.array(pools[:-1]) + 1)
    assert [int(s[0]) for s in stages] == [64, 128, 256, 512, 512] and all((s == s[0]).all() for s in stages)
  assert [len(s) for s in np.split(np.array(V.VGG16_WIDTHS), np.array(V.VGG16_POOL_AFTER[:-1]) + 1)] == [2, 2, 3, 3, 3]
  assert L.VGG19 is V.VGG19 and L.LARGE_MODELS['vgg16'] is V.VGG16  # the old import path still works
  # Conv widths scaled by the multiplier, the head taken as given and appended (its nodes are masked).
  m = models.create_model('vgg16', None, 10, 0.25, head=(100,))
  assert m.widths == tuple(w // 4 for w in V.VGG16_WIDTHS) + (100,) and m.head == (100,)
  assert models.create_model('vgg19', None, 10).head == ()  # the default: no hidden FC
  assert models.create_model('vgg16', m.widths, 10) == m  # widths ending with the head imply it
  assert model_from_spec(spec_of(m)) == m
  assert L.layer_names(m)[-2:] == ('conv12', 'fc0') and L.incoming_params(m)[-1] == (('fc0',),)
  with pytest.raises(ValueError, match='head'):
    models.create_model('vgg16', m.widths, 10, head=(99,))
  with pytest.raises(ValueError, match='13 conv widths'):
    models.create_model('vgg16', (8,) * 12, 10)
  with pytest.raises(ValueError, match='positive'):
    models.create_model('vgg19', None, 10, head=(0,))
  with pytest.raises(ValueError, match='head'):  # the module itself checks widths against head
    V.VGG19(head=(8,)).init(jax.random.key(0), jnp.zeros((1, *SHAPE), jnp.uint8), (jnp.ones(1),) * 17)


def test_masked_head_node_outputs_zero_and_its_weights_do_not_matter():
  model, theta, images = setup('vgg16_head')
  masks = [np.ones(w, np.float32) for w in model.widths]
  masks[-1][3] = 0  # node 3 of the last hidden FC layer
  logits, stats = run(model, theta, images, masks)
  assert (np.asarray(stats[-1].abs_mean)[:, 3] == 0).all() and (np.asarray(stats[-1].zero_frac)[:, 3] == 1).all()
  params, batch_stats = theta_lib.split(theta)
  fc = dict(params['fc1'])
  fc['kernel'] = fc['kernel'].at[:, 3].set(100.0)
  fc['bias'] = fc['bias'].at[3].set(-7.0)
  other = theta_lib.variables_from({**params, 'fc1': fc}, batch_stats)
  np.testing.assert_array_equal(run(model, other, images, masks)[0], logits)
  assert not np.allclose(run(model, other, images)[0], run(model, theta, images)[0])  # unmasked, it matters


def test_head_dropout_is_train_only_keyed_and_keeps_masked_nodes_silent():
  model, theta, images = setup('vgg19_head')  # dropout 0.3 after the head's FC layer
  masks = tuple(jnp.asarray(m) for m in case_masks(model, 0.6, seed=2))
  variables = theta_lib.variables(theta)

  @jax.jit
  def apply_train(key):
    return model.apply(variables, images, masks, train=True, mutable=['batch_stats'], rngs={'dropout': key})[0]

  def train_logits(key):
    logits, stats = apply_train(key)
    return np.asarray(logits), stats

  a, stats = train_logits(jax.random.key(1))
  np.testing.assert_array_equal(a, train_logits(jax.random.key(1))[0])  # the same key drops the same units
  assert not np.allclose(a, train_logits(jax.random.key(2))[0])
  dropped = np.asarray(masks[-1]) == 0
  assert dropped.any() and (np.asarray(stats[-1].abs_mean)[:, dropped] == 0).all()
  plain = model.clone(dropout=0.0)
  np.testing.assert_array_equal(run(model, theta, images, masks)[0], run(plain, theta, images, masks)[0])


# -- the torch twin ------------------------------------------------------------------------------------


@pytest.mark.parametrize('case', sorted(CASES))
def test_twin_eval_logits_and_stats(case):
  model, theta, images = setup(case)
  masks = case_masks(model, 0.6)
  want, want_stats = run(model, theta, images, masks)
  twin = twin_of(model, theta).eval()
  with torch.no_grad():
    got, got_stats = twin(torch.from_numpy(np.array(images)), tuple(torch.from_numpy(m) for m in masks))
  assert np.abs(want).max() > 0.05
  np.testing.assert_allclose(got.double().numpy(), want, rtol=0, atol=1e-5)
  assert len(got_stats) == len(want_stats) == len(model.widths)
  for g, w in zip(got_stats, want_stats):
    np.testing.assert_allclose(g.abs_mean.numpy(), np.asarray(w.abs_mean), rtol=0, atol=1e-5)
    np.testing.assert_allclose(g.zero_frac.numpy(), np.asarray(w.zero_frac), rtol=0, atol=1e-6)
  back = to_flax_params(twin)
  same = jax.tree.map(lambda a, b: bool(np.array_equal(np.asarray(a), b)), theta_lib.params(theta), back)
  assert all(jax.tree.leaves(same))


def test_twin_train_mode_batch_statistics():
  """Train mode normalises with the batch's statistics in both, and the running mean and variance
  update alike (the unbiased batch variance, as torch: `layers.BatchNorm`)."""
  model, theta, images = setup('vgg16_head')
  masks = tuple(jnp.asarray(m) for m in case_masks(model, 0.6, seed=3))
  (logits, _), new = model.apply(theta_lib.variables(theta), images, masks, train=True, mutable=['batch_stats'])
  twin = twin_of(model, theta).train()
  got, _ = twin(torch.from_numpy(np.array(images)), tuple(torch.from_numpy(np.array(m)) for m in masks))
  np.testing.assert_allclose(got.detach().double().numpy(), np.asarray(logits, np.float64), rtol=0, atol=1e-4)
  old = theta_lib.batch_stats(theta)
  for i, bn in enumerate(twin.bns):
    np.testing.assert_allclose(bn.running_mean.numpy(), np.asarray(new['batch_stats'][f'bn{i}']['mean']), atol=1e-5)
    np.testing.assert_allclose(bn.running_var.numpy(), np.asarray(new['batch_stats'][f'bn{i}']['var']), rtol=2e-4,
                               atol=1e-5)
    assert not np.allclose(np.asarray(old[f'bn{i}']['var']), np.asarray(new['batch_stats'][f'bn{i}']['var']))


def test_modelc_head_twin():
  model = models.create_model('modelc', (4, 5, 6, 3), NUM_CLASSES, head=(11, 9, 5))
  shape = (12, 12, 3)
  theta = random_theta(model, shape)
  images = jnp.asarray(np.random.default_rng(2).integers(0, 256, (5, *shape)), jnp.uint8)
  masks = case_masks(model, 0.6)
  twin = load_flax_params(tmodels.create_model('modelc', model.widths, NUM_CLASSES, shape, head=model.head), theta)
  assert [l.out_features for l in twin.dense] == [11, 9, 5, NUM_CLASSES]
  with torch.no_grad():
    got, _ = twin(torch.from_numpy(np.array(images)), tuple(torch.from_numpy(m) for m in masks))
  np.testing.assert_allclose(got.double().numpy(), run(model, theta, images, masks)[0], rtol=0, atol=1e-5)
  small, small_theta = compact.compact(model, theta, masks)
  assert small.head == model.head  # Model C's head is not masked: kept whole
  assert tcompact.max_abs_diff(small, small_theta, tcompact.to_torch(small, small_theta, shape), images) <= 1e-5


# -- compaction and accounting ------------------------------------------------------------------------


@pytest.mark.parametrize('case,keep', [('vgg16_head', 0.25), ('vgg19_head', 0.6), ('vgg19', 0.25)])
def test_compact_equals_masked_and_its_twin(tmp_path, case, keep):
  model, theta, images = setup(case)
  masks = case_masks(model, keep, seed=1)
  small, small_theta = compact.compact(model, theta, masks)
  assert type(small) is type(model) and small.widths == tuple(int(m.sum()) for m in masks)
  assert small.head == small.widths[model.num_convs():]
  want, want_stats = run(model, theta, images, masks)
  got, got_stats = run(small, small_theta, images)
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
  for s_small, s_full, m in zip(got_stats, want_stats, masks, strict=True):
    np.testing.assert_allclose(np.asarray(s_small.abs_mean), np.asarray(s_full.abs_mean)[:, m > 0], atol=1e-5)
  counts = accounting.count(small, SHAPE)
  assert counts.params == sum(a.size for a in jax.tree.leaves(theta_lib.params(small_theta)))
  assert counts.batch_stats == sum(a.size for a in jax.tree.leaves(theta_lib.batch_stats(small_theta)))
  assert accounting.masked_counts(model, SHAPE, masks) == counts
  # The export (spec with the head) and its torch twin compute the masked network's logits.
  assert tcompact.export(str(tmp_path), small, small_theta, SHAPE) <= 1e-5
  loaded, loaded_theta, spec = compact.load(str(tmp_path))
  assert loaded == small and spec['head'] == list(small.head)
  twin = tcompact.load_torch(str(tmp_path))
  with torch.no_grad():
    got_t, _ = twin(torch.from_numpy(np.array(images)), tmodels.full_masks(twin), with_stats=False)
  np.testing.assert_allclose(got_t.double().numpy(), want, rtol=0, atol=1e-5)
  assert sum(p.numel() for p in twin.parameters()) == counts.params


def test_empty_head_layer_makes_a_constant_network():
  model, theta, images = setup('vgg16_head')
  masks = case_masks(model, 0.6)
  masks[-2][:] = 0  # the first hidden FC layer keeps nothing
  small, small_theta = compact.compact(model, theta, masks, image_shape=SHAPE)
  assert isinstance(small, ConstantModel)
  np.testing.assert_allclose(run(small, small_theta, images)[0], run(model, theta, images, masks)[0], atol=1e-5)


def test_accounting_counts_the_head():
  model = models.create_model('vgg19', None, 200, head=(1024,))
  counts = accounting.count(model, (64, 64, 3))
  fc = {l.name: l for l in counts.layers if l.kind == 'dense'}
  assert (fc['fc0'].in_features, fc['fc0'].params) == (512, 512 * 1024 + 1024)  # GAP: 512 features
  assert fc['classifier'].params == 1024 * 200 + 200
  shapes = jax.eval_shape(lambda: models.init_params(model, jax.random.key(0), (64, 64, 3)))
  assert counts.params == sum(a.size for a in jax.tree.leaves(shapes['params'])) == 20_760_200


# -- criteria and magnitude pruning see the head ------------------------------------------------------


def test_dropnet_criteria_drop_head_nodes():
  model, theta, images = setup('vgg16_head')
  _, stats = run(model, theta, images)
  sums = StatSums(tuple(s.abs_mean.sum(0) for s in stats), tuple(s.zero_frac.sum(0) for s in stats),
                  jnp.float32(images.shape[0]))
  full = models.full_masks(model)
  inputs = criteria.PruneInputs(theta, sums, full, jax.random.key(0), 0.5)
  new = criteria.get('min_layer')(inputs, criteria.Context())
  for m, s, w in zip(new[-2:], stats[-2:], model.head):  # each head layer loses its lowest-scoring half
    kept = np.asarray(m) > 0
    assert kept.sum() == w - w // 2
    score = np.asarray(s.abs_mean).mean(0)
    assert score[~kept].max() <= score[kept].min()
  new = criteria.get('min')(inputs, criteria.Context())  # global: head nodes rank with the filters
  assert sum(int(np.asarray(m).sum()) for m in new) == sum(model.widths) - sum(model.widths) // 2


def test_magnitude_pruning_covers_the_head_kernels():
  model, theta, _ = setup('vgg16_head')
  names = weight_masks.prunable_names(theta)
  assert {'params/fc0/kernel', 'params/fc1/kernel', 'params/classifier/kernel'} <= set(names)
  assert not any('/bn' in n for n in names)  # batch norm is not prunable by default
  without_output = weight_masks.prunable_names(theta, output_layer=False)
  assert 'params/fc1/kernel' in without_output and 'params/classifier/kernel' not in without_output


# -- Torch-Pruning ------------------------------------------------------------------------------------


class PlainVGG(nn.Module):
  """The twin's layers without masks, for Torch-Pruning's tracer: GAP as AdaptiveAvgPool2d + flatten."""

  def __init__(self, twin: tmodels.VGG):
    super().__init__()
    self.convs, self.bns, self.fcs, self.classifier = twin.convs, twin.bns, twin.fcs, twin.classifier
    self.pool_after, self.gap = twin.POOL_AFTER, nn.AdaptiveAvgPool2d(1)

  def forward(self, x):
    for i, (conv, bn) in enumerate(zip(self.convs, self.bns)):
      x = F.relu(bn(conv(x)))
      if i in self.pool_after:
        x = F.max_pool2d(x, 2, ceil_mode=True)
    x = self.gap(x).flatten(1)
    for fc in self.fcs:
      x = F.relu(fc(x))
    return self.classifier(x)


def test_torch_pruning_vgg16_with_head():
  tp = pytest.importorskip('torch_pruning')
  model, theta, images = setup('vgg16_head')
  masks = case_masks(model, 0.4, seed=5)
  small, small_theta = compact.compact(model, theta, masks)
  plain = PlainVGG(twin_of(model, theta)).eval()
  x = torch.from_numpy(np.array(images, np.float32) / 255).permute(0, 3, 1, 2).contiguous()
  graph = tp.DependencyGraph().build_dependency(plain, example_inputs=x[:1], verbose=False)
  n = model.num_convs()
  layers = [(c, tp.prune_conv_out_channels) for c in plain.convs] + [(f, tp.prune_linear_out_channels)
                                                                     for f in plain.fcs]
  for (layer, how), mask in zip(layers, masks, strict=True):
    dropped = np.flatnonzero(mask == 0).tolist()
    if dropped:
      group = graph.get_pruning_group(layer, how, idxs=dropped)
      assert graph.check_pruning_group(group)
      group.prune()
  counts = accounting.count(small, SHAPE)
  assert sum(p.numel() for p in plain.parameters()) == counts.params
  params, stats = theta_lib.split(small_theta)
  for i, (conv, bn) in enumerate(zip(plain.convs, plain.bns)):  # the same filters and BN entries, in order
    kernel = np.asarray(params[f'conv{i}']['kernel']).transpose(3, 2, 0, 1)
    np.testing.assert_array_equal(conv.weight.detach().numpy(), kernel)
    np.testing.assert_array_equal(bn.running_var.numpy(), np.asarray(stats[f'bn{i}']['var']))
  for j, fc in enumerate(plain.fcs):
    np.testing.assert_array_equal(fc.weight.detach().numpy(), np.asarray(params[f'fc{j}']['kernel']).T)
  assert len(plain.convs) == n
  with torch.no_grad():
    got = plain(x).double().numpy()
  np.testing.assert_allclose(got, np.asarray(compact.predict(small, small_theta, images), np.float64), atol=1e-5)
  # Torch-Pruning's ops: our MACs + 2 per batch-norm output (affine) + the pool's input + the Linear biases.
  ops, tp_params = tp.utils.count_ops_and_params(plain, x[:1])
  bn_ops = sum(2 * l.out_hw[0] * l.out_hw[1] * l.out_features for l in counts.layers if l.kind == 'batchnorm')
  dense = [l for l in counts.layers if l.kind == 'dense']
  assert tp_params == counts.params
  assert ops == counts.macs + bn_ops + dense[0].in_features + sum(l.out_features for l in dense)


# -- full-width figures -------------------------------------------------------------------------------

FULL_WIDTH = [  # (--model, head, image shape, classes, params)
    # The DropNet reproduction report's Tiny ImageNet VGG19 (FC1024 -> FC200), with GAP (flatten: 22,333,064).
    ('vgg19', (1024,), (64, 64, 3), 200, 20_760_200),
    # VGG16 on CIFAR-10: the common CIFAR VGG16 (conv biases before BN) has 14,728,266, i.e. ours + the
    # 4,224 conv biases (64*2 + 128*2 + 256*3 + 512*6) that batch norm makes redundant.
    ('vgg16', (), (32, 32, 3), 10, 14_724_042),
    ('modelc', (512, 256), (32, 32, 3), 10, 4_588_874),  # the ensemble deck's deeper Model C head
]


def test_full_width_parameter_counts():
  """Our count (accounting), Flax's θ and torch's sum(p.numel()) of the twin agree at full width.
  `pytest -s` prints the table."""
  for name, head, shape, classes, want in FULL_WIDTH:
    model = models.create_model(name, None, classes, head=head)
    ours = accounting.count(model, shape).params
    flax = sum(a.size for a in jax.tree.leaves(theta_lib.params(
        jax.eval_shape(lambda: models.init_params(model, jax.random.key(0), shape)))))
    with torch.device('meta'):  # shapes only: no memory, no initialisation
      twin = tmodels.create_model(name, model.widths, classes, shape, head=head)
    torch_count = sum(p.numel() for p in twin.parameters())
    print(f'{name:<7} head={str(head):<12} {shape} {classes:>3} classes: accounting {ours:,} flax {flax:,} '
          f'torch {torch_count:,}')
    assert ours == flax == torch_count == want


def test_titles_name_the_head():
  from dropnet_jax.models.small import default_widths
  from dropnet_jax.runs.titles import model_title
  assert model_title('vgg16', V.VGG16_WIDTHS) == 'VGG16'
  assert model_title('vgg19', default_widths('vgg19', 0.25) + (1024,)) == 'VGG19 (width x0.25) + FC1024'
  assert model_title('vgg16', V.VGG16_WIDTHS + (512, 256)) == 'VGG16 + FC512-FC256'
