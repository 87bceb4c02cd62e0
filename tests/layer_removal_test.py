"""Layer removal (`stages`, a ResNet18 model field) through spec.json, compaction and accounting, and what
compaction does when DropNet empties a block's residual branch (the block keeps its identity path, exactly)
or a whole residual group (constant: the masks themselves cut the stream, documented in compaction.compact).
Torch twin parity of the stage-removed network: structured_torch_test.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dropnet_jax import models
from dropnet_jax.compaction import accounting, compact
from dropnet_jax.models import large as L
from dropnet_jax.models.compact import ConstantModel, model_from_spec, spec_of
from compact_test import random_theta, run

SHAPE = (16, 16, 3)
NUM_CLASSES = 7
IMAGES = jnp.asarray(np.random.default_rng(1).integers(0, 256, (5, *SHAPE)), jnp.uint8)


def tiny(name, stages):
  model = models.create_model(name, None, NUM_CLASSES, width_multiplier=0.125, stages=stages)
  return model, random_theta(model, SHAPE)


def masks_of(model, keep=0.6, seed=0, empty=()):
  rng = np.random.default_rng(seed)
  names = L.resnet18_layer_names(model.stages)
  masks = []
  for name, w in zip(names, model.widths):
    m = (rng.random(w) < keep).astype(np.float32)
    m[rng.integers(w)] = 1.0
    masks.append(m * (name not in empty))
  return masks


def test_stages_are_a_model_setting_carried_by_specs_and_compact_networks(tmp_path):
  model, theta = tiny('resnet18_bn', (1, 2, 3))
  assert len(model.widths) == 15 and L.layer_names(model)[-1] == 'block5/out'
  spec = spec_of(model)
  assert spec['stages'] == [1, 2, 3] and model_from_spec(spec) == model
  assert spec_of(models.create_model('resnet18_bn', None, 10))['stages'] == [1, 2, 3, 4]
  masks = masks_of(model)
  small, small_theta = compact.compact(model, theta, masks)
  assert small.stages == (1, 2, 3) and spec_of(small)['stages'] == [1, 2, 3]
  compact.save(str(tmp_path / 'export'), small, small_theta, image_shape=SHAPE)
  loaded, loaded_theta, _ = compact.load(str(tmp_path / 'export'))
  assert loaded == small
  np.testing.assert_allclose(run(loaded, loaded_theta, IMAGES)[0], run(model, theta, IMAGES, masks)[0], atol=1e-5)


def test_bad_stages_are_one_clear_error():
  with pytest.raises(ValueError, match='stages must be an increasing non-empty subset of 1,2,3,4'):
    models.create_model('resnet18', None, 10, stages=(3, 2))
  with pytest.raises(ValueError, match='stages .layer removal. applies to resnet18 and resnet18_bn, not vgg19'):
    models.create_model('vgg19', None, 10, stages=(1, 2))
  with pytest.raises(ValueError, match='with stages 1,2,3 needs 15 positive masked-layer widths'):
    models.create_model('resnet18', L.resnet18_widths(), 10, stages=(1, 2, 3))


@pytest.mark.parametrize('name,stages', [('resnet18', (1, 2, 3)), ('resnet18_bn', (2, 4))])
def test_compaction_of_a_stage_removed_network_is_exact_and_counted(name, stages):
  model, theta = tiny(name, stages)
  masks = masks_of(model, keep=0.5, seed=2)
  small, small_theta = compact.compact(model, theta, masks)
  np.testing.assert_allclose(run(small, small_theta, IMAGES)[0], run(model, theta, IMAGES, masks)[0], atol=1e-5)
  counts = accounting.count(small, SHAPE)
  assert counts.params == sum(a.size for a in jax.tree.leaves(small_theta.get('params', small_theta)))
  assert accounting.masked_counts(model, SHAPE, masks) == counts


@pytest.mark.parametrize('name', ['resnet18', 'resnet18_bn'])
def test_an_emptied_residual_branch_keeps_the_identity_path(name):
  """Every conv1 of stage 1 and of block3 dropped: those blocks compute relu(x + c) (c: conv2's bias, or bn2 of
  zeros), so the stream survives; compaction keeps it with zero-width conv1s and no conv2 weights."""
  model, theta = tiny(name, None)
  empty = ('block0/conv1', 'block1/conv1', 'block3/conv1')
  masks = masks_of(model, empty=empty)
  p = compact.plan(model, masks)
  assert not p.constant
  small, small_theta = compact.compact(model, theta, masks)
  assert not isinstance(small, ConstantModel)
  np.testing.assert_allclose(run(small, small_theta, IMAGES)[0], run(model, theta, IMAGES, masks)[0], atol=1e-5)
  counts = {l.name: l for l in accounting.count(small, SHAPE).layers}
  for block in ('block0', 'block1', 'block3'):
    assert counts[f'{block}/conv1'].out_features == 0
    assert counts[f'{block}/conv2'].macs == 0 and counts[f'{block}/conv2'].in_features == 0


def test_an_emptied_branch_with_zero_bias_is_exactly_the_identity():
  """No batch norm, conv2's bias 0: block1 = relu(x + 0) = x on its input (x >= 0), bit for bit."""
  model, theta = tiny('resnet18', None)
  conv2 = {**theta['block1']['conv2'], 'bias': jnp.zeros_like(theta['block1']['conv2']['bias'])}
  theta = {**theta, 'block1': {**theta['block1'], 'conv2': conv2}}
  masks = [np.ones(w, np.float32) for w in model.widths]
  masks[L.resnet18_layer_names().index('block1/conv1')][:] = 0
  _, stats = run(model, theta, IMAGES, masks)
  index = L.resnet18_layer_names().index
  np.testing.assert_array_equal(np.asarray(stats[index('block1/out')].abs_mean),
                                np.asarray(stats[index('block0/out')].abs_mean))
  small, small_theta = compact.compact(model, theta, masks)
  np.testing.assert_array_equal(np.asarray(run(small, small_theta, IMAGES)[1][index('block1/out')].abs_mean),
                                np.asarray(stats[index('block1/out')].abs_mean))


def test_where_shapes_allow_no_identity_the_network_is_constant():
  """A projection block with conv1 and shortcut emptied has no path from its input (stride 2, new channels):
  the masked network's logits do not depend on the image, and compaction says so exactly."""
  model, theta = tiny('resnet18_bn', None)
  masks = masks_of(model, empty=('block4/conv1', 'block4/shortcut'))
  masked = run(model, theta, IMAGES, masks)[0]
  np.testing.assert_allclose(masked, np.broadcast_to(masked[:1], masked.shape), atol=1e-6)
  small, small_theta = compact.compact(model, theta, masks, image_shape=SHAPE)
  assert isinstance(small, ConstantModel)
  np.testing.assert_allclose(run(small, small_theta, IMAGES)[0], masked, atol=1e-5)


def test_dropnet_prunes_a_stage_removed_network():
  """DropNet's criteria (global and layer-wise) on resnet18_bn with stages 2 and 3 only: two cycles each, units
  dropped, the record's params those of its compact network (counted like any model)."""
  from dropnet_jax.config import DropNetConfig, TrainConfig
  from dropnet_jax.loop import dropnet
  from dropnet_jax.loop.driver import RunIO
  from dropnet_jax.pruning import masks as mask_ops
  from resnet_bn_test import SHAPE as BN_SHAPE, tiny_data
  model = models.create_model('resnet18_bn', L.resnet18_widths((4, 4, 4, 4), (2, 3)), 4, stages=(2, 3))
  metrics = ('max_layer', 'apoz')
  config = DropNetConfig(metrics=metrics, fraction=0.5, floor=0.6,
                         train=TrainConfig(max_epochs=1, batch_size=16, eval_batch_size=16))
  records = dropnet.run_experiment(model, BN_SHAPE, tiny_data(), [0], config, io=RunIO(log=lambda s: None))
  for metric in metrics:
    mine = [r for r in records if r['metric'] == metric]
    assert [r['cycle'] for r in mine] == [0, 1] and all(np.isfinite(r['test_loss']) for r in mine)
    pruned = mask_ops.masks_from_strings(mine[1]['mask'])
    assert 0 < sum(int(m.sum()) for m in pruned) < sum(model.widths)
    assert mine[1]['params'] == accounting.summary(model, BN_SHAPE, pruned)['params'] < mine[0]['params']
