"""resnet18_bn: the CIFAR ResNet18 with batch norm against its PyTorch twin, Torch-Pruning and its own
masked form (compaction), and through every pruning path (DropNet criteria, magnitude pruning).

Tiny widths (stages 8-16-32-64, compact_test's ResNet18 widths, so its structural mask cases apply)
on 16x16x3 inputs keep compilation short; the parameter count is checked at full width (shapes only).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dropnet_jax import models
from dropnet_jax import theta as theta_lib
from dropnet_jax.compaction import accounting, compact
from dropnet_jax.models import large as L
from dropnet_jax.models.compact import CompactResNet18BN, ConstantModel, model_from_spec, spec_of
from dropnet_jax.models.resnet_bn import ResNet18BN
from dropnet_jax.pruning import weight_masks
from compact_test import CASES, NUM_CLASSES, case_masks, random_theta, run  # noqa: E402

WIDTHS = CASES['resnet18'][0]
SHAPE = (16, 16, 3)
INDEX = {n: i for i, n in enumerate(L.resnet18_layer_names())}


@functools.lru_cache(maxsize=None)
def setup():
  model = models.create_model('resnet18_bn', WIDTHS, NUM_CLASSES)
  theta = random_theta(model, SHAPE)
  images = jnp.asarray(np.random.default_rng(1).integers(0, 256, (6, *SHAPE)), jnp.uint8)
  return model, theta, images


def test_full_width_parameter_count_and_structure():
  model = models.create_model('resnet18_bn', None, 10)
  assert isinstance(model, ResNet18BN) and model.initializer == 'torch'  # 'auto': PyTorch's init
  theta = jax.eval_shape(lambda: models.init_params(model, jax.random.key(0), (32, 32, 3)))
  n_params = sum(a.size for a in jax.tree.leaves(theta['params']))
  n_stats = sum(a.size for a in jax.tree.leaves(theta['batch_stats']))
  counts = accounting.count(model, (32, 32, 3))
  assert n_params == counts.params == 11_173_962  # kuangliu/pytorch-cifar's ResNet18 (torch's count below)
  assert n_stats == counts.batch_stats == 2 * (64 + 4 * 64 + 5 * 128 + 5 * 256 + 5 * 512)
  assert counts.macs == accounting.count(models.create_model('resnet18', None, 10), (32, 32, 3)).macs
  assert L.layer_names(model) == L.resnet18_layer_names() and len(L.incoming_params(model)) == 20
  assert models.create_model('resnet18_bn', None, 10, width_multiplier=0.25).widths == L.resnet18_widths(
      (16, 32, 64, 128))
  with pytest.raises(ValueError, match='shortcut'):
    models.create_model('resnet18_bn', tuple(w + (i == 6) for i, w in enumerate(L.resnet18_widths())), 10)


def test_compact_logits_equal_masked_logits():
  model, theta, images = setup()
  for case in ('keep25', 'zero_width_layers', 'disjoint_members', 'group2_dropped'):
    masks = case_masks('resnet18', case)
    small, small_theta = compact.compact(model, theta, masks, image_shape=SHAPE)
    want, want_stats = run(model, theta, images, masks)
    got, got_stats = run(small, small_theta, images)
    assert np.abs(want).max() > 0.05
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5, err_msg=case)
    if case == 'group2_dropped':
      assert isinstance(small, ConstantModel)
      continue
    assert isinstance(small, CompactResNet18BN)
    assert accounting.count(small, SHAPE).params == sum(a.size for a in jax.tree.leaves(small_theta['params']))
    assert accounting.masked_counts(model, SHAPE, masks) == accounting.count(small, SHAPE)
    for s_small, s_full, idx in zip(got_stats, want_stats, compact.plan(model, masks).live, strict=True):
      np.testing.assert_allclose(np.asarray(s_small.abs_mean), np.asarray(s_full.abs_mean)[:, idx], atol=1e-5)
      np.testing.assert_array_equal(np.asarray(s_small.zero_frac), np.asarray(s_full.zero_frac)[:, idx])
    if case == 'zero_width_layers':
      assert min(small.widths) == 0
    if case == 'disjoint_members':
      assert any(i < 0 for idx in small.shortcut_index for i in idx)


def test_dropped_filters_change_nothing_and_bn_is_sliced_with_its_conv():
  """Junk in every parameter and statistic feeding a dropped unit changes no logit (train and eval)."""
  model, theta, images = setup()
  masks = tuple(jnp.asarray(m) for m in case_masks('resnet18', 'keep25'))
  junk = jax.tree.map(np.array, theta)
  for layer, paths in enumerate(L.incoming_params(model)):
    dropped = np.flatnonzero(np.asarray(masks[layer]) == 0)
    for path in paths:
      for collection in ('params', 'batch_stats'):
        node = junk[collection]
        for p in path:
          node = node.get(p, {})
        for leaf in node.values():
          leaf[..., dropped] = 7.0
  for train in (False, True):
    apply = lambda t: model.apply(theta_lib.variables(t), images, masks, train=train,
                                  mutable=['batch_stats'] if train else False)
    out, out_junk = apply(theta), apply(junk)
    logits, logits_junk = (o[0][0] if train else o[0] for o in (out, out_junk))
    np.testing.assert_allclose(np.asarray(logits_junk), np.asarray(logits), atol=1e-5)
  assert not np.allclose(run(model, junk, images)[0], run(model, theta, images)[0])  # junk matters unmasked


def test_spec_save_load_and_magnitude_selection(tmp_path):
  model, theta, images = setup()
  assert model_from_spec(spec_of(model)) == model
  small, small_theta = compact.compact(model, theta, case_masks('resnet18', 'zero_width_layers'))
  compact.save(str(tmp_path / 'export'), small, small_theta, {'cycle': 1}, image_shape=SHAPE)
  loaded, loaded_theta, spec = compact.load(str(tmp_path / 'export'))
  assert loaded == small and spec['model'] == 'resnet18_bn_compact'
  np.testing.assert_array_equal(np.asarray(compact.predict(loaded, loaded_theta, images)),
                                np.asarray(compact.predict(small, small_theta, images)))
  # Magnitude pruning's default prunable set: the 21 conv/Dense kernels, no BN scale/bias, no statistics.
  names = weight_masks.prunable_names(theta)
  assert len(names) == 21 and all(n.endswith('/kernel') for n in names)
  with_bn = weight_masks.prunable_names(theta, batch_norm=True)
  assert len(with_bn) == 21 + 2 * 20 and not any('batch_stats' in n for n in with_bn)


def tiny_data(n_classes=4):
  from dropnet_jax.training.trainer import DeviceData
  rng = np.random.default_rng(0)
  images = lambda n: jnp.asarray(rng.integers(0, 256, (n, *SHAPE), np.uint8))
  labels = lambda n: jnp.asarray(np.arange(n) % n_classes, jnp.int32)
  return DeviceData(images(32), labels(32), images(16), labels(16), images(16), labels(16))


def test_every_dropnet_criterion_runs_on_it():
  """A tiny DropNet run with every registered unit criterion (one trainer, so its programs compile
  once): two cycles each, finite records, units dropped, BN statistics carried in θ."""
  from dropnet_jax.config import DropNetConfig, TrainConfig
  from dropnet_jax.loop import dropnet
  from dropnet_jax.loop.driver import RunIO
  from dropnet_jax.pruning import criteria
  from dropnet_jax.pruning import masks as mask_ops
  model = models.create_model('resnet18_bn', L.resnet18_widths((4, 4, 4, 4)), 4)
  metrics = tuple(criteria.names('unit'))
  config = DropNetConfig(metrics=metrics, fraction=0.5, floor=0.6,
                         train=TrainConfig(max_epochs=1, batch_size=16, eval_batch_size=16))
  records = dropnet.run_experiment(model, SHAPE, tiny_data(), [0], config, io=RunIO(log=lambda s: None))
  assert {r['metric'] for r in records} == set(metrics)
  for metric in metrics:
    mine = [r for r in records if r['metric'] == metric]
    assert [r['cycle'] for r in mine] == [0, 1] and all(np.isfinite(r['test_loss']) for r in mine)
    pruned = mask_ops.masks_from_strings(mine[1]['mask'])
    assert 0 < sum(int(m.sum()) for m in pruned) < sum(model.widths)
    assert mine[1]['params'] == accounting.summary(model, SHAPE, pruned)['params'] < mine[0]['params']


def test_magnitude_pruning_masks_kernels_only():
  """Global L1 (torch's global_unstructured semantics) over the default selection: half of all kernel
  entries go, BN scale/bias and the running statistics are never masked, the masked θ runs."""
  from dropnet_jax.pruning import weight_criteria
  model, theta, images = setup()
  wmask = weight_masks.init_weight_mask(theta)
  pruned = weight_criteria.global_l1(theta, wmask, 0.5)
  kept = sum(float(m.sum()) for m in jax.tree.leaves(pruned))
  total = sum(m.size for m in jax.tree.leaves(pruned))
  assert kept == total - round(0.5 * total)
  masked = weight_masks.apply_weight_mask(theta, pruned)
  jax.tree.map(np.testing.assert_array_equal, masked['batch_stats'], theta['batch_stats'])
  assert all(np.array_equal(masked['params'][b]['bn1']['scale'], theta['params'][b]['bn1']['scale'])
             for b in ('block0', 'block7'))
  logits = run(model, masked, images)[0]
  assert np.isfinite(logits).all() and not np.allclose(logits, run(model, theta, images)[0])
