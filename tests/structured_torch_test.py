"""Structured pruning at init and layer removal against the PyTorch twin and Torch-Pruning (test-only).

* Layer removal: resnet18_bn without stage 4 has the twin's parameter count (2,777,674 on CIFAR-10: the
  report's "2.8 M"; the classifier reads 256 channels) and, at tiny width, the twin's logits.
* Rates: Torch-Pruning's `MetaPruner` with `pruning_ratio_dict` keyed by the blocks (each block's
  submodules get its rate, local pruning: what keying the stage modules layer1..layer4 does), the
  classifier ignored, prunes the twin to our widths and parameter count (full size, the report's rates),
  and with `MagnitudeImportance(p=1)` on the same θ0 keeps our channels: the pruned twin's weights are
  our compact network's, array for array.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

torch = pytest.importorskip('torch')
tp = pytest.importorskip('torch_pruning')

from dropnet_jax import models  # noqa: E402
from dropnet_jax.compaction import accounting, compact  # noqa: E402
from dropnet_jax.models import large as L  # noqa: E402
from dropnet_jax.pruning import structured as S  # noqa: E402
from tests.torch_reference import models as tmodels  # noqa: E402
from tests.torch_reference.weights import load_flax_variables, to_flax_variables  # noqa: E402
from compact_test import random_theta  # noqa: E402
from resnet_bn_torch_test import Plain  # noqa: E402  (the twin as Torch-Pruning traces it)

pytestmark = pytest.mark.usefixtures('one_torch_thread')
CIFAR = (32, 32, 3)
REPORT_RATES = (0.1, 0.1, 0.2, 0.2, 0.2, 0.2, 0.3, 0.3)


def torch_prune(twin, rates, importance):
  """Torch-Pruning's MetaPruner on the twin: block b of the kept blocks at rates[b]."""
  plain = Plain(twin).eval()
  blocks = twin.blocks()
  pruner = tp.pruner.MetaPruner(plain, torch.zeros(1, 3, 32, 32), importance=importance,
                                pruning_ratio_dict={blk: r for blk, r in zip(blocks, rates)},
                                ignored_layers=[twin.classifier])
  pruner.step()
  return plain


def twin_widths(twin):
  """The masked-layer widths of a (pruned) twin, in resnet18_layer_names order."""
  widths = [twin.stem.out_channels]
  for blk in twin.blocks():
    widths += [blk.conv1.out_channels] + ([blk.shortcut.out_channels] if blk.projection else [])
    widths += [blk.conv2.out_channels]
  return tuple(widths)


@pytest.mark.parametrize('stages', [(1, 2, 3, 4), (1, 2, 3)])
def test_stage_removed_parameter_count_equals_the_twins(stages):
  model = models.create_model('resnet18_bn', None, 10, stages=stages)
  twin = tmodels.create_model('resnet18_bn', None, 10, CIFAR, stages=stages)
  counts = accounting.count(model, CIFAR)
  assert counts.params == sum(p.numel() for p in twin.parameters())
  assert counts.params == {4: 11_173_962, 3: 2_777_674}[len(stages)]
  assert counts.layers[-1].in_features == twin.classifier.in_features == (512 if 4 in stages else 256)


def test_stage_removed_logits_equal_the_twins():
  model = models.create_model('resnet18_bn', None, 7, width_multiplier=0.125, stages=(1, 3, 4))
  assert [n for n in L.resnet18_layer_names((1, 3, 4)) if n.endswith('/out')] == [
      f'block{b}/out' for b in (0, 1, 4, 5, 6, 7)]
  theta = random_theta(model, (16, 16, 3))
  twin = load_flax_variables(tmodels.create_model('resnet18_bn', model.widths, 7, (16, 16, 3), stages=(1, 3, 4)),
                             theta).eval()
  images = np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3)).astype(np.uint8)
  with torch.no_grad():
    want, _ = twin(torch.from_numpy(images), tmodels.full_masks(twin))
  got = compact.predict(model, theta, images)
  np.testing.assert_allclose(np.asarray(got, np.float64), want.double().numpy(), atol=1e-5)


BUDGET_RATE = 0.3300781250000685  # S.rate_for_budget(resnet18_bn, CIFAR, 5e6): 4,982,948 parameters


@pytest.mark.parametrize('stages,rates,params', [((1, 2, 3, 4), REPORT_RATES, 5_990_811),
                                                 ((1, 2, 3), REPORT_RATES[:6], 1_794_943),
                                                 ((1, 2, 3, 4), (BUDGET_RATE,) * 8, 4_982_948)])
def test_rates_give_torch_prunings_widths_and_params(stages, rates, params):
  model = models.create_model('resnet18_bn', None, 10, stages=stages)
  masks = S.first_channels_masks(model, S.group_rates(model, rates))
  ours = accounting.masked_counts(model, CIFAR, masks)
  torch.manual_seed(0)
  pruned = torch_prune(tmodels.create_model('resnet18_bn', None, 10, CIFAR, stages=stages), rates,
                       tp.importance.RandomImportance())
  assert twin_widths(pruned.twin) == tuple(int(m.sum()) for m in masks)
  assert ours.params == sum(p.numel() for p in pruned.parameters())
  assert ours.params == params


@pytest.mark.parametrize('stages', [(1, 2, 3, 4), (1, 2, 3)])
def test_l1_importance_keeps_torch_prunings_channels(stages):
  model = models.create_model('resnet18_bn', None, 10, width_multiplier=0.25, stages=stages)
  theta0 = random_theta(model, CIFAR, seed=3)  # random BN scales too: they count in the importance
  rates = (0.3, 0.5, 0.2, 0.4, 0.25, 0.1, 0.3, 0.3)[:S.rate_slots(model)]
  masks = S.prune_at_init(model, theta0, S.group_rates(model, rates), 'l1', jax.random.key(0))
  small, small_theta = compact.compact(model, theta0, masks)
  twin = load_flax_variables(tmodels.create_model('resnet18_bn', model.widths, 10, CIFAR, stages=stages), theta0)
  pruned = torch_prune(twin, rates, tp.importance.MagnitudeImportance(p=1))
  back = to_flax_variables(pruned.twin)
  theirs = jax.tree.map(np.asarray, back['params'])
  jax.tree.map(np.testing.assert_array_equal, theirs, jax.tree.map(np.asarray, small_theta['params']))
  assert accounting.count(small, CIFAR).params == sum(p.numel() for p in pruned.parameters())
