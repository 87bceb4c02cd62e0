"""resnet18_bn against PyTorch: the twin (tests/torch_reference ResNet18BN) and Torch-Pruning.

* eval-mode logits and per-unit stats of the masked network equal the twin's (same θ, random BN
  statistics) to 1e-5;
* SGD steps in train mode (batch statistics; lr 0.1, momentum 0.9, weight decay 5e-4) give the
  same parameters and running statistics as torch.optim.SGD (layers.BatchNorm folds the unbiased
  batch variance into running_var, as torch; Flax's nn.BatchNorm would fold the biased one);
* the 'auto' (PyTorch) initialiser draws from the twin's default-init distributions;
* Torch-Pruning, pruning the twin's filters with masks shared by each residual group (what a
  dependency graph can express), gives our compact network's parameter count, weights and outputs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import stats as scipy_stats

torch = pytest.importorskip('torch')

from dropnet_jax import models  # noqa: E402
from dropnet_jax import theta as theta_lib  # noqa: E402
from dropnet_jax.compaction import accounting, compact  # noqa: E402
from dropnet_jax.models import large as L  # noqa: E402
from tests.torch_reference import models as tmodels  # noqa: E402
from tests.torch_reference.weights import load_flax_variables, to_flax_variables  # noqa: E402
from resnet_bn_test import INDEX, SHAPE, WIDTHS, run, setup  # noqa: E402
from compact_test import NUM_CLASSES, case_masks  # noqa: E402

pytestmark = pytest.mark.usefixtures('one_torch_thread')
LR, MOMENTUM, WEIGHT_DECAY = 0.1, 0.9, 5e-4


def twin_of(model, theta):
  twin = tmodels.create_model('resnet18_bn', model.widths, model.num_classes, SHAPE)
  return load_flax_variables(twin, theta_lib.variables(jax.tree.map(np.asarray, theta)))


def torch_masks(masks):
  return tuple(torch.from_numpy(np.asarray(m, np.float32)) for m in masks)


def test_full_width_twin_has_torchs_parameter_count():
  twin = tmodels.create_model('resnet18_bn', None, 10, (32, 32, 3))
  assert sum(p.numel() for p in twin.parameters()) == 11_173_962
  ours = jax.eval_shape(lambda: models.init_params(models.create_model('resnet18_bn', None, 10),
                                                   jax.random.key(0), (32, 32, 3)))
  assert sum(a.size for a in jax.tree.leaves(ours['params'])) == 11_173_962
  buffers = sum(b.numel() for n, b in twin.named_buffers() if not n.endswith('num_batches_tracked'))
  assert buffers == sum(a.size for a in jax.tree.leaves(ours['batch_stats']))


def test_eval_logits_and_stats_equal_the_twins():
  model, theta, images = setup()
  masks = case_masks('resnet18', 'keep25')
  twin = twin_of(model, theta).eval()
  back = to_flax_variables(twin)  # the transfer is lossless both ways
  jax.tree.map(np.testing.assert_array_equal, back, jax.tree.map(np.asarray, theta_lib.variables(theta)))
  with torch.no_grad():
    logits, stats = twin(torch.from_numpy(np.array(images)), torch_masks(masks))
  want, want_stats = run(model, theta, images, masks)
  assert np.abs(want).max() > 0.05
  np.testing.assert_allclose(logits.double().numpy(), want, rtol=0, atol=1e-5)
  assert len(stats) == len(want_stats) == 20
  for s, w in zip(stats, want_stats):
    np.testing.assert_allclose(s.abs_mean.numpy(), np.asarray(w.abs_mean), atol=1e-5)
    np.testing.assert_allclose(s.zero_frac.numpy(), np.asarray(w.zero_frac), atol=1e-6)


def test_sgd_steps_in_train_mode_match_torch():
  model, theta, images = setup()
  masks = case_masks('resnet18', 'keep60')
  labels = np.arange(images.shape[0]) % NUM_CLASSES
  twin = twin_of(model, theta).train()
  sizes = {}  # per BN module: the elements each channel's batch statistics average over
  for name, module in twin.named_modules():
    if isinstance(module, torch.nn.BatchNorm2d):
      module.register_forward_hook(lambda m, i, o, name=name: sizes.__setitem__(name, i[0].numel() // i[0].shape[1]))
  opt = torch.optim.SGD(twin.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
  tx = optax.chain(optax.add_decayed_weights(WEIGHT_DECAY), optax.sgd(LR, momentum=MOMENTUM))
  jmasks = tuple(jnp.asarray(m) for m in masks)

  def loss(params, batch_stats, x, y):
    (logits, _), new = model.apply({'params': params, 'batch_stats': batch_stats}, x, jmasks, train=True,
                                   mutable=['batch_stats'])
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), (logits, new['batch_stats'])

  @jax.jit
  def step(params, batch_stats, opt_state, x, y):
    (value, (logits, batch_stats)), grads = jax.value_and_grad(loss, has_aux=True)(params, batch_stats, x, y)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), batch_stats, opt_state, value, logits

  params, batch_stats = theta['params'], theta['batch_stats']
  opt_state = tx.init(params)
  for batch in (slice(0, 6), slice(1, 5)):  # two steps: the second uses the momentum buffer
    x, y = images[batch], labels[batch]
    params, batch_stats, opt_state, value, logits = step(params, batch_stats, opt_state, x, jnp.asarray(y))
    opt.zero_grad()
    t_logits, _ = twin(torch.from_numpy(np.array(x)), torch_masks(masks))
    t_loss = torch.nn.functional.cross_entropy(t_logits, torch.from_numpy(y.astype(np.int64)))
    t_loss.backward()
    opt.step()
    np.testing.assert_allclose(np.asarray(logits), t_logits.detach().numpy(), atol=1e-5)
    np.testing.assert_allclose(float(value), t_loss.item(), atol=1e-6)
    theirs = to_flax_variables(twin)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), b, atol=1e-5), params, theirs['params'])
    for module in sizes:  # every BN layer's running mean and variance
      ours, theirs_bn = get_path(batch_stats, module.split('.')), get_path(theirs['batch_stats'], module.split('.'))
      np.testing.assert_allclose(np.asarray(ours['mean']), theirs_bn['mean'], atol=1e-5, err_msg=module)
      # torch and layers.BatchNorm fold the unbiased batch variance into the running one (Flax's
      # nn.BatchNorm would fold the biased one, (n-1)/n of it: far off on the 2x2 maps checked below).
      np.testing.assert_allclose(np.asarray(ours['var']), theirs_bn['var'], rtol=1e-5, atol=1e-6, err_msg=module)
  assert min(sizes.values()) <= 6 * 2 * 2  # the smallest maps (2x2 at batch 6): the factor is far from 1 there


def get_path(tree, path):
  for p in path:
    tree = tree[p]
  return tree


def test_torch_initializer_draws_like_the_twins_default_init():
  torch.manual_seed(0)
  widths = L.resnet18_widths((16, 32, 32, 32))
  model = models.create_model('resnet18_bn', widths, 10)  # 'auto': torch
  # 8x8 images (the shapes do not depend on them) and an 'rbg' key: an eager init of ~20 convs is slow on CPU.
  theta = models.init_params(model, jax.random.key(0, impl='rbg'), (8, 8, 3))
  theirs = to_flax_variables(tmodels.create_model('resnet18_bn', widths, 10, (32, 32, 3)))
  ours = jax.tree.map(np.asarray, theta)
  for collection in ('params', 'batch_stats'):
    leaves = jax.tree_util.tree_flatten_with_path(ours[collection])[0]
    for path, leaf in leaves:
      names = [k.key for k in path]
      ref = get_path(theirs[collection], names)
      assert leaf.shape == ref.shape, names
      if names[-1] in ('scale', 'var') or (names[-1] in ('bias', 'mean') and names[-2] != 'classifier'):
        np.testing.assert_array_equal(leaf, ref, err_msg=str(names))  # BN: ones and zeros, as torch
        continue
      kernel = get_path(ours['params'], names[:-1])['kernel']
      bound = 1 / np.sqrt(np.prod(kernel.shape[:-1]))
      assert np.abs(leaf).max() <= bound and np.abs(ref).max() <= bound * (1 + 1e-6)
      if leaf.size >= 500:
        assert scipy_stats.ks_2samp(leaf.ravel(), ref.ravel()).pvalue > 1e-3, names
        assert np.abs(leaf).max() > 0.98 * bound


def group_masks():
  """Random masks in which the members of every residual group share their mask (conv1s are free)."""
  masks = case_masks('resnet18', 'keep60')
  groups = [('stem', 'block0/out', 'block1/out'), ('block2/shortcut', 'block2/out', 'block3/out'),
            ('block4/shortcut', 'block4/out', 'block5/out'), ('block6/shortcut', 'block6/out', 'block7/out')]
  for group in groups:
    shared = masks[INDEX[group[0]]]
    for name in group[1:]:
      masks[INDEX[name]] = shared.copy()
  return masks


class Plain(torch.nn.Module):
  """The twin without masks on NCHW float input: what Torch-Pruning traces."""

  def __init__(self, twin):
    super().__init__()
    self.twin = twin

  def forward(self, x):
    features, _ = self.twin.features(x, None, with_stats=False)
    return self.twin.classifier(features)


def test_torch_pruning_removes_what_compact_removes():
  tp = pytest.importorskip('torch_pruning')
  model, theta, images = setup()
  masks = group_masks()
  small, small_theta = compact.compact(model, theta, masks)
  assert all(idx == tuple(range(len(idx))) for idx in small.shortcut_index)  # shared masks: nothing gathered
  plain = Plain(twin_of(model, theta)).eval()
  x = torch.from_numpy(np.asarray(images, np.float32) / 255).permute(0, 3, 1, 2).contiguous()
  graph = tp.DependencyGraph().build_dependency(plain, example_inputs=x[:1], verbose=False)
  twin = plain.twin
  blocks = twin.blocks()
  # One pruning group per residual group (through its first member: the graph couples the others) and
  # per conv1; the graph also removes the BNs, the readers' input channels and the classifier's columns.
  targets = [(twin.stem, 'stem')] + [(b.conv1, f'block{i}/conv1') for i, b in enumerate(blocks)]
  targets += [(blocks[i].shortcut, f'block{i}/shortcut') for i in (2, 4, 6)]
  for conv, name in targets:
    dropped = np.flatnonzero(masks[INDEX[name]] == 0).tolist()
    if dropped:
      group = graph.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=dropped)
      assert graph.check_pruning_group(group)
      group.prune()
  counts = accounting.count(small, SHAPE)
  assert sum(p.numel() for p in plain.parameters()) == counts.params
  ours = jax.tree.map(np.asarray, small_theta)
  back = to_flax_variables(twin)
  jax.tree.map(np.testing.assert_array_equal, back['params'], ours['params'])  # the same filters, same order
  jax.tree.map(np.testing.assert_array_equal, back['batch_stats'], ours['batch_stats'])
  with torch.no_grad():
    got = plain(x).double().numpy()
  np.testing.assert_allclose(got, np.asarray(compact.predict(small, small_theta, images), np.float64), atol=1e-5)
  ops, params = tp.utils.count_ops_and_params(plain, x[:1])
  assert params == counts.params
  # Its convention: our MACs plus 2 ops per BN output element (scale and shift) and the classifier's bias adds.
  bn_elements = sum(l.out_hw[0] * l.out_hw[1] * l.out_features for l in counts.layers if l.kind == 'batchnorm')
  assert ops == counts.macs + 2 * bn_elements + NUM_CLASSES
