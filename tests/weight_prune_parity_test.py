"""Weight pruning parity with torch.nn.utils.prune on the torch twins of Model A and Model B.

Same weights (θ copied with weights.load_flax_params) -> the same global and
layer-wise L1 masks as `prune.global_unstructured(..., L1Unstructured)` and
`prune.l1_unstructured`, through repeated prunes (amounts of the remaining
weights, torch's rounding); the same pruned counts as torch's random
pruning; torch's and our choices where magnitudes tie (documented, not
equal); and a short masked SGD-with-momentum retraining that keeps the same
zeros and the same weights in both.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

torch = pytest.importorskip('torch')

import torch.nn.functional as F  # noqa: E402
from torch.nn.utils import prune  # noqa: E402

from dropnet_jax import models  # noqa: E402
from dropnet_jax.pruning import weight_criteria as wc  # noqa: E402
from dropnet_jax.pruning import weight_masks as wm  # noqa: E402
from tests.torch_reference import models as tmodels  # noqa: E402
from tests.torch_reference.weights import load_flax_params  # noqa: E402

IMAGE_SHAPE = (28, 28, 1)
MODELS = {'A': ('fc', (40, 40)), 'B': ('conv', (8, 16))}
AMOUNTS = (0.2, 0.2, 0.2, 0.5)
JIT = {name: jax.jit(fn, static_argnums=2) for name, fn in wc.WEIGHT_CRITERIA.items()}


# Torch on one thread (conftest.one_torch_thread).
pytestmark = pytest.mark.usefixtures('one_torch_thread')


def twins(which: str, seed: int = 0):
  """(flax model, flax params, torch twin with the same params)."""
  name, widths = MODELS[which]
  model = models.create_model(name, widths, 10)
  params = models.init_params(model, jax.random.PRNGKey(seed), IMAGE_SHAPE)
  tmodel = tmodels.create_model(name, widths, 10, IMAGE_SHAPE)
  return model, params, load_flax_params(tmodel, params)


def torch_kernels(tmodel) -> dict[str, torch.nn.Module]:
  """Flax kernel name -> the torch layer holding it (weights.py's naming)."""
  out = {f'Conv_{i}/kernel': m for i, m in enumerate(tmodel.convs)}
  out.update({f'Dense_{i}/kernel': m for i, m in enumerate(tmodel.dense)})
  return out


def to_flax_layout(t: torch.Tensor) -> np.ndarray:
  """OIHW -> HWIO, (out, in) -> (in, out)."""
  t = t.detach()
  return (t.permute(2, 3, 1, 0) if t.dim() == 4 else t.T).contiguous().numpy()


def assert_same_masks(wmask, tmodel, tensor: str = 'weight'):
  ours = wm.named_leaves(wmask)
  layers = torch_kernels(tmodel)
  assert set(ours) == set(layers)
  for name, layer in layers.items():
    np.testing.assert_array_equal(np.asarray(ours[name]), to_flax_layout(getattr(layer, tensor + '_mask')),
                                  err_msg=name)


def assert_no_tie_at_threshold(params, before, after):
  """The weights pruned this round are strictly smaller than every weight still kept: nothing to break."""
  mags = {n: np.abs(np.asarray(x)) for n, x in wm.named_leaves(params).items()}
  b, a = wm.named_leaves(before), wm.named_leaves(after)
  pruned = np.concatenate([mags[n][(np.asarray(b[n]) > 0) & (np.asarray(a[n]) == 0)] for n in b])
  kept = np.concatenate([mags[n][np.asarray(a[n]) > 0] for n in a])
  assert pruned.max() < kept.min()


@pytest.mark.parametrize('which', sorted(MODELS))
def test_global_l1_equals_torch_global_unstructured(which):
  _, params, tmodel = twins(which)
  targets = [(m, 'weight') for m in torch_kernels(tmodel).values()]
  w = wm.init_weight_mask(params)
  for i, amount in enumerate(AMOUNTS):
    prune.global_unstructured(targets, pruning_method=prune.L1Unstructured, amount=amount)
    new = JIT['global_l1'](params, w, amount, jax.random.PRNGKey(i))
    assert_no_tie_at_threshold(params, w, new)
    w = new
    assert_same_masks(w, tmodel)
  total = sum(int(np.size(m)) for m in jax.tree.leaves(w))
  assert wm.fraction_remaining(w) == pytest.approx(0.8 ** 3 * 0.5, abs=4 / total)


@pytest.mark.parametrize('which', sorted(MODELS))
def test_layer_l1_equals_torch_l1_unstructured(which):
  _, params, tmodel = twins(which, seed=1)
  w = wm.init_weight_mask(params)
  for i, amount in enumerate(AMOUNTS):
    for layer in torch_kernels(tmodel).values():
      prune.l1_unstructured(layer, 'weight', amount=amount)
    new = JIT['layer_l1'](params, w, amount, jax.random.PRNGKey(i))
    for name in wm.mask_names(w):  # per leaf: no tie at that leaf's threshold
      sub = lambda t: {name.split('/')[0]: {'kernel': wm.named_leaves(t)[name]}}
      assert_no_tie_at_threshold(sub(params), sub(w), sub(new))
    w = new
    assert_same_masks(w, tmodel)


def test_random_pruning_counts_equal_torch():
  """Random pruning draws different weights in torch and here, but the same number per round."""
  _, params, tmodel = twins('B')
  _, _, tmodel_layer = twins('B')
  targets = [(m, 'weight') for m in torch_kernels(tmodel).values()]
  wg = wl = wm.init_weight_mask(params)
  torch.manual_seed(0)
  for i, amount in enumerate(AMOUNTS):
    prune.global_unstructured(targets, pruning_method=prune.RandomUnstructured, amount=amount)
    for layer in torch_kernels(tmodel_layer).values():
      prune.random_unstructured(layer, 'weight', amount=amount)
    wg = JIT['global_random'](params, wg, amount, jax.random.PRNGKey(i))
    wl = JIT['layer_random'](params, wl, amount, jax.random.PRNGKey(100 + i))
    torch_global = {n: int(m.weight_mask.sum()) for n, m in torch_kernels(tmodel).items()}
    torch_layer = {n: int(m.weight_mask.sum()) for n, m in torch_kernels(tmodel_layer).items()}
    assert sum(wm.kept_counts(wg).values()) == sum(torch_global.values())
    assert wm.kept_counts(wl) == torch_layer


def test_rounding_of_the_count_equals_torch():
  """Sizes and amounts whose products are (nearly) half-integers: 0.5 * 7, 0.3 * 95, 0.7 * 45, ...

  One tensor per size, pruned layer-wise: torch's l1_unstructured on each, our layer_l1 on all.
  """
  sizes = (5, 7, 15, 45, 90, 95, 190)
  rng = np.random.default_rng(0)
  layers, params = [], {}
  for i, size in enumerate(sizes):
    values = rng.permutation(np.arange(1, size + 1)).astype(np.float32) / size  # distinct magnitudes
    layer = torch.nn.Linear(size, 1, bias=False)
    with torch.no_grad():
      layer.weight.copy_(torch.from_numpy(values[None, :]))
    layers.append(layer)
    params[f'Dense_{i}'] = {'kernel': jnp.asarray(values[:, None])}
  w = wm.init_weight_mask(params)
  for amount in (0.5, 0.3, 0.7, 0.35, 0.15):
    w = JIT['layer_l1'](params, w, amount, None)
    for i, layer in enumerate(layers):
      prune.l1_unstructured(layer, 'weight', amount=amount)
      np.testing.assert_array_equal(np.asarray(w[f'Dense_{i}']['kernel']), to_flax_layout(layer.weight_mask),
                                    err_msg=f'size {sizes[i]}, amount {amount}')


def test_ties_torch_and_ours_prune_the_same_count_within_the_tied_set():
  """Equal magnitudes at the threshold: torch's pick comes from torch.topk's selection algorithm, ours from
  the key (or position); both prune all smaller weights, no larger one, and the same number of tied ones.

  Two cases: a kernel with values in {±1, ±2, ±3} (8 tied at |w| = 1, 6 to prune), and Model A with its
  zero-initialised biases selected, where the first global prune takes only zero biases in both.
  """
  values = np.array([1, -2, 3, -1, 2, 1, -3, -1, 2, 1, -1, 3, 2, -2, 1, 3, -1, 2, 3, -3, 2, 2, 3, -2], np.float32)
  layer = torch.nn.Linear(6, 4, bias=False)
  with torch.no_grad():
    layer.weight.copy_(torch.from_numpy(values.reshape(4, 6)))
  prune.l1_unstructured(layer, 'weight', amount=0.25)
  theirs = to_flax_layout(layer.weight_mask)
  params = {'Dense_0': {'kernel': jnp.asarray(values.reshape(4, 6).T)}}
  ours = np.asarray(JIT['layer_l1'](params, wm.init_weight_mask(params), 0.25, jax.random.PRNGKey(0))
                    ['Dense_0']['kernel'])
  mag = np.abs(values.reshape(4, 6).T)
  for mask in (theirs, ours):
    assert np.sum(mask == 0) == 6 and np.all(mag[mask == 0] == 1) and np.all(mask[mag > 1] == 1)

  _, params, tmodel = twins('A')
  targets = [(m, t) for m in tmodel.dense for t in ('weight', 'bias')]
  n_bias = sum(int(m.bias.numel()) for m in tmodel.dense)
  prune.global_unstructured(targets, pruning_method=prune.L1Unstructured, amount=0.001)
  w = JIT['global_l1'](params, wm.init_weight_mask(params, biases=True), 0.001, jax.random.PRNGKey(0))
  total = sum(int(np.size(x)) for x in jax.tree.leaves(params))
  n_pruned = round(0.001 * total)
  assert 0 < n_pruned < n_bias
  torch_bias_pruned = sum(int((m.bias_mask == 0).sum()) for m in tmodel.dense)
  torch_weight_pruned = sum(int((m.weight_mask == 0).sum()) for m in tmodel.dense)
  kept = wm.kept_counts(w)
  ours_bias_pruned = sum(int(np.size(params[f'Dense_{i}']['bias'])) - kept[f'Dense_{i}/bias'] for i in range(3))
  ours_weight_pruned = sum(int(np.size(params[f'Dense_{i}']['kernel'])) - kept[f'Dense_{i}/kernel']
                           for i in range(3))
  assert (torch_bias_pruned, torch_weight_pruned) == (ours_bias_pruned, ours_weight_pruned) == (n_pruned, 0)


@pytest.mark.parametrize('which', sorted(MODELS))
def test_masked_retraining_keeps_the_same_zeros(which):
  """3 global L1 prunes of 0.2 in both, then 10 SGD steps (momentum 0.9) on the same batch."""
  model, params, tmodel = twins(which, seed=2)
  targets = [(m, 'weight') for m in torch_kernels(tmodel).values()]
  w = wm.init_weight_mask(params)
  for _ in range(3):
    prune.global_unstructured(targets, pruning_method=prune.L1Unstructured, amount=0.2)
    w = JIT['global_l1'](params, w, 0.2, None)
  assert_same_masks(w, tmodel)

  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (32, *IMAGE_SHAPE), dtype=np.uint8)
  labels = rng.integers(0, 10, 32)
  node_masks = models.full_masks(model)
  tx = wm.masked_updates(optax.sgd(0.05, momentum=0.9))

  @jax.jit
  def step(p, s):
    def loss(p):
      logits, _ = model.apply({'params': wm.apply_weight_mask(p, w)}, jnp.asarray(images), node_masks)
      return optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(labels)).mean()
    updates, s = tx.update(jax.grad(loss)(p), s, p, weight_mask=w)
    return optax.apply_updates(p, updates), s

  p, s = params, tx.init(params)  # θ not zeroed first: the masked update zeroes the pruned weights
  for _ in range(10):
    p, s = step(p, s)

  opt = torch.optim.SGD(tmodel.parameters(), lr=0.05, momentum=0.9)
  timages, tlabels = torch.from_numpy(images), torch.from_numpy(labels)
  tmasks = tmodels.full_masks(tmodel)
  for _ in range(10):
    opt.zero_grad()
    logits, _ = tmodel(timages, tmasks, with_stats=False)
    F.cross_entropy(logits, tlabels).backward()
    opt.step()

  ours = wm.named_leaves(p)
  for name, layer in torch_kernels(tmodel).items():
    mask = np.asarray(wm.named_leaves(w)[name])
    theirs = to_flax_layout(layer.weight_orig * layer.weight_mask)  # torch's effective weight
    mine = np.asarray(ours[name])
    np.testing.assert_array_equal(mine == 0, mask == 0, err_msg=name)
    np.testing.assert_array_equal(theirs == 0, mask == 0, err_msg=name)
    np.testing.assert_allclose(mine, theirs, rtol=1e-4, atol=2e-6, err_msg=name)
    np.testing.assert_allclose(np.asarray(ours[name.replace('kernel', 'bias')]), layer.bias.detach().numpy(),
                               rtol=1e-4, atol=2e-6, err_msg=name)
    assert np.mean(mine[mask > 0] != np.asarray(wm.named_leaves(params)[name])[mask > 0]) > 0.5  # it trained
