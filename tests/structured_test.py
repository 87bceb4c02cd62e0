"""Structured pruning at init (`pruning.structured`): rates -> widths with residual groups, the budget's
bisection, and the L1 importance against a float64 hand computation. Torch-Pruning parity is in
structured_torch_test.py; the reduced end-to-end run in structured_run_test.py.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from dropnet_jax import models
from dropnet_jax.compaction import accounting, compact
from dropnet_jax.loop.structured import StructuredConfig
from dropnet_jax.models import large as L
from dropnet_jax.pruning import structured as S
from compact_test import random_theta

REPORT_RATES = (0.1, 0.1, 0.2, 0.2, 0.2, 0.2, 0.3, 0.3)  # "10 % on layers 1-2, 20 % on 3-6, 30 % on 7-8"
CIFAR = (32, 32, 3)


def test_resnet_groups_and_the_reports_rates_to_widths():
  model = models.create_model('resnet18_bn', None, 10)
  groups = S.channel_groups(model)
  index = {n: i for i, n in enumerate(L.resnet18_layer_names())}
  streams = [g.layers for g in groups if len(g.layers) > 1]
  assert streams == [tuple(index[n] for n in names) for names in (
      ('stem', 'block0/out', 'block1/out'), ('block2/shortcut', 'block2/out', 'block3/out'),
      ('block4/shortcut', 'block4/out', 'block5/out'), ('block6/shortcut', 'block6/out', 'block7/out'))]
  assert sorted(i for g in groups for i in g.layers) == list(range(20))  # every masked layer in one group
  rates = S.group_rates(model, REPORT_RATES)
  # Per stage (stream, conv1 of each block): int(C * (1 - r)) as Torch-Pruning counts.
  assert S.group_widths(model, rates) == (57,) * 3 + (102,) * 3 + (204,) * 3 + (358,) * 3
  masks = S.first_channels_masks(model, rates)
  for g in groups:  # the members of a group share one mask
    assert all(np.array_equal(masks[i], masks[g.layers[0]]) for i in g.layers)
  small = compact.compact_model(model, masks)
  assert all(idx == tuple(range(len(idx))) for idx in small.shortcut_index)  # nothing gathered
  assert S.pruned_params(model, CIFAR, rates) == accounting.count(small, CIFAR).params == 5_990_811


def test_rates_of_a_stage_removed_resnet_and_of_chains():
  model = models.create_model('resnet18', None, 10, stages=(1, 2, 3))
  assert S.rate_slots(model) == 6
  rates = S.group_rates(model, REPORT_RATES[:6])
  assert S.group_widths(model, rates) == (57,) * 3 + (102,) * 3 + (204,) * 3
  chain = models.create_model('modelc', (10, 10, 20, 20), 10)
  assert S.group_widths(chain, S.group_rates(chain, (0.5, 0.25, 0.05, 0.99))) == (5, 7, 19, 1)  # at least 1
  assert S.group_widths(chain, S.group_rates(chain, (0.3,))) == (7, 7, 14, 14)
  with pytest.raises(ValueError, match=r'--prune_rates needs one rate per basic block \(6\)'):
    S.group_rates(model, REPORT_RATES)
  with pytest.raises(ValueError, match=r'--prune_rates must be in \[0, 1\)'):
    S.group_rates(chain, (0.5, 1.0, 0.1, 0.1))


def test_kept_count_is_torch_prunings_floor():
  assert [S.kept_count(c, r) for c, r in [(64, 0.1), (128, 0.2), (512, 0.3), (10, 0.3), (3, 0.7), (1, 0.5)]] == \
      [57, 102, 358, 7, 1, 1]


@pytest.mark.parametrize('stages', [None, (1, 2, 3)])
def test_budget_bisection_finds_the_smallest_uniform_rate(stages):
  model = models.create_model('resnet18_bn', None, 10, stages=stages)
  n = len(S.channel_groups(model))
  budget = 1e6
  rate = S.rate_for_budget(model, CIFAR, budget)
  assert S.pruned_params(model, CIFAR, (rate,) * n) <= budget < S.pruned_params(model, CIFAR, (rate - 1e-11,) * n)
  assert S.rate_for_budget(model, CIFAR, 2e7) == 0.0  # the dense network fits
  with pytest.raises(ValueError, match='--param_budget=100'):
    S.rate_for_budget(model, CIFAR, 100)


def test_l1_importance_equals_a_float64_hand_computation():
  model = models.create_model('resnet18_bn', L.resnet18_widths((8, 16, 32, 64)), 7)
  theta = random_theta(model, CIFAR)
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), theta['params'])
  groups = {g.name: g for g in S.channel_groups(model)}
  out_l1 = lambda k: np.abs(k).sum(axis=(0, 1, 2))  # HWIO: per output channel
  in_l1 = lambda k: np.abs(k).sum(axis=(0, 1, 3))  # per input channel
  # Stage 1's stream: the stem and both blocks' conv2 (+ BN scales) write it; block0/1's conv1 and block2's
  # conv1 and projection shortcut read it.
  hand = (out_l1(p['stem']['kernel']) + np.abs(p['stem_bn']['scale'])
          + sum(out_l1(p[b]['conv2']['kernel']) + np.abs(p[b]['bn2']['scale']) for b in ('block0', 'block1'))
          + sum(in_l1(p[b]['conv1']['kernel']) for b in ('block0', 'block1', 'block2'))
          + in_l1(p['block2']['shortcut']['kernel']))
  np.testing.assert_allclose(S.l1_importance(theta['params'], groups['stem']), hand, rtol=1e-12)
  # The last stream is read by the classifier (Dense rows).
  last = groups['block6/shortcut']
  hand = (out_l1(p['block6']['shortcut']['kernel']) + np.abs(p['block6']['shortcut_bn']['scale'])
          + sum(out_l1(p[b]['conv2']['kernel']) + np.abs(p[b]['bn2']['scale']) for b in ('block6', 'block7'))
          + in_l1(p['block7']['conv1']['kernel']) + np.abs(p['classifier']['kernel']).sum(axis=1))
  np.testing.assert_allclose(S.l1_importance(theta['params'], last), hand, rtol=1e-12)
  hand = out_l1(p['block3']['conv1']['kernel']) + np.abs(p['block3']['bn1']['scale']) + in_l1(
      p['block3']['conv2']['kernel'])
  np.testing.assert_allclose(S.l1_importance(theta['params'], groups['block3/conv1']), hand, rtol=1e-12)
  # The mask keeps the most important channels of each group.
  masks = S.prune_at_init(model, theta, S.group_rates(model, (0.5,)), 'l1', jax.random.key(0))
  keep = np.flatnonzero(masks[0])
  scores = S.l1_importance(theta['params'], groups['stem'])
  assert len(keep) == 4 and scores[keep].min() > np.delete(scores, keep).max()


def test_l1_importance_reads_a_flatten_and_random_importance_depends_on_the_key():
  model = models.create_model('modelc', (3, 4, 5, 6), 7)
  theta = random_theta(model, (8, 8, 3))
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), theta)
  last = S.channel_groups(model)[-1]
  dense = np.abs(p['Dense_0']['kernel']).reshape(2 * 2, 6, -1).sum(axis=(0, 2))  # NHWC flatten, c fastest
  hand = np.abs(p['Conv_3']['kernel']).sum(axis=(0, 1, 2)) + dense
  np.testing.assert_allclose(S.l1_importance(theta, last), hand, rtol=1e-12)
  rates = S.group_rates(model, (0.5,))
  a, b = (S.prune_at_init(model, theta, rates, 'random', jax.random.key(k)) for k in (0, 1))
  assert [int(m.sum()) for m in a] == [int(m.sum()) for m in b] == [1, 2, 2, 3]
  assert any(not np.array_equal(x, y) for x, y in zip(a, b))


def test_config_errors_name_the_flag():
  for config, match in [(StructuredConfig(), 'exactly one of --prune_rates and --param_budget'),
                        (StructuredConfig(rates=(0.1,), param_budget=5e6), 'exactly one'),
                        (StructuredConfig(rates=(1.2,)), r'--prune_rates must be in \[0, 1\)'),
                        (StructuredConfig(param_budget=-1.0), '--param_budget must be a positive'),
                        (StructuredConfig(rates=(0.1,), importances=('l2',)), '--importance must be some of')]:
    with pytest.raises(ValueError, match=match):
      config.validate()


def test_the_methods_rates_from_a_budget_are_uniform_and_fit():
  from dropnet_jax.loop.structured import resolve_rates
  model = models.create_model('resnet18_bn', None, 10)
  rates = resolve_rates(model, CIFAR, StructuredConfig(param_budget=5e6))
  assert len(set(rates)) == 1 and len(rates) == len(S.channel_groups(model))
  assert S.group_widths(model, rates) == (42,) * 3 + (85,) * 3 + (171,) * 3 + (342,) * 3
  assert S.pruned_params(model, CIFAR, rates) == 4_982_948  # Torch-Pruning at that rate: the same (README)
  assert resolve_rates(model, CIFAR, StructuredConfig(rates=(0.2,))) == (0.2,) * 12
