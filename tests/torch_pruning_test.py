"""Compaction against Torch-Pruning (a test-only dependency, like torch) on Models B and C.

The torch twin of the masked model (tests/torch_reference, same
weights) is pruned by Torch-Pruning's dependency graph, removing exactly the
filters the masks drop (the graph also removes the next conv's input channels
and the Linear's columns behind the flatten). The pruned torch network must
have our compact network's parameter count, its conv weights and its
outputs, and Torch-Pruning's op count must be our MACs plus one add per
biased output element (its convention).
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

torch = pytest.importorskip('torch')
tp = pytest.importorskip('torch_pruning')

import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from dropnet_jax.compaction import accounting  # noqa: E402

from dropnet_jax.compaction import compact
from tests.torch_reference import models as tmodels  # noqa: E402
from tests.torch_reference.weights import load_flax_params  # noqa: E402
from compact_test import CASES, NUM_CLASSES, case_masks, setup  # noqa: E402


class Plain(nn.Module):
  """A torch twin's layers without masks, in torch's own layout (NCHW input and flatten).

  Torch-Pruning maps filter c of the last conv to the Linear columns
  c*H*W .. (c+1)*H*W-1 (NCHW flatten) and treats a permute as elementwise, so
  the twin's NHWC flatten (Flax's order) would have the wrong columns removed;
  here the Linear's columns are reordered from (h, w, c) to (c, h, w) instead.
  """

  def __init__(self, twin: nn.Module, pool_after: tuple[int, ...], hw: tuple[int, int]):
    super().__init__()
    self.convs, self.dense, self.pool_after = twin.convs, twin.dense, pool_after
    first = self.dense[0]
    c = self.convs[-1].out_channels
    with torch.no_grad():
      w = first.weight.reshape(first.out_features, hw[0], hw[1], c).permute(0, 3, 1, 2)
      first.weight.copy_(w.reshape(first.out_features, -1))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    for i, conv in enumerate(self.convs):
      x = F.relu(conv(x))
      if i in self.pool_after:
        x = F.max_pool2d(x, 2)
    x = x.flatten(1)
    for j, layer in enumerate(self.dense):
      x = layer(x)
      if j + 1 < len(self.dense):
        x = F.relu(x)
    return x


# Torch on one thread (conftest.one_torch_thread).
pytestmark = pytest.mark.usefixtures('one_torch_thread')


@pytest.mark.parametrize('name,case', [('conv', 'keep60'), ('conv', 'keep25'), ('modelc', 'keep60'),
                                       ('modelc', 'keep25')])
def test_torch_pruning_removes_what_compact_removes(name, case):
  model, theta, images = setup(name)
  shape = CASES[name][1]
  masks = case_masks(name, case)
  small, small_theta = compact.compact(model, theta, masks)

  pool_after = tuple(range(len(model.widths))) if name == 'conv' else tuple(range(1, len(model.widths), 2))
  hw = (shape[0] // 2**len(pool_after), shape[1] // 2**len(pool_after))
  twin = load_flax_params(tmodels.create_model(name, model.widths, NUM_CLASSES, shape), theta)
  plain = Plain(twin, pool_after, hw).eval()
  x = torch.from_numpy(np.array(images, np.float32) / 255).permute(0, 3, 1, 2).contiguous()
  graph = tp.DependencyGraph().build_dependency(plain, example_inputs=x[:1], verbose=False)
  for conv, mask in zip(plain.convs, masks):
    dropped = np.flatnonzero(mask == 0).tolist()
    if dropped:
      group = graph.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=dropped)
      assert graph.check_pruning_group(group)
      group.prune()

  counts = accounting.count(small, shape)
  assert sum(p.numel() for p in plain.parameters()) == counts.params
  assert counts.params == sum(a.size for a in jax.tree.leaves(small_theta))
  for i, conv in enumerate(plain.convs):  # the same filters, in the same order
    ours = np.asarray(small_theta[f'Conv_{i}']['kernel']).transpose(3, 2, 0, 1)
    np.testing.assert_array_equal(conv.weight.detach().numpy(), ours)
    np.testing.assert_array_equal(conv.bias.detach().numpy(), np.asarray(small_theta[f'Conv_{i}']['bias']))
  with torch.no_grad():
    got = plain(x).double().numpy()
  np.testing.assert_allclose(got, np.asarray(compact.predict(small, small_theta, images), np.float64), atol=1e-5)

  ops, params = tp.utils.count_ops_and_params(plain, x[:1])
  bias_adds = sum(l.out_hw[0] * l.out_hw[1] * l.out_features for l in counts.layers)
  assert params == counts.params and ops == counts.macs + bias_adds
