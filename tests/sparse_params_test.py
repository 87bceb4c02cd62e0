"""runs.sparse_params: a weight-pruned θ's mask and sparse form rebuild it exactly, in each of the sparse form's
encodings (every weight kept, a bitmap, flat indices), for a params tree and a θ with batch-norm statistics."""

import jax
import numpy as np
import pytest

from dropnet_jax.runs import sparse_params


def _theta(rng, with_stats):
  params = {'Dense_0': {'kernel': rng.normal(size=(300, 40)).astype(np.float32),
                        'bias': rng.normal(size=40).astype(np.float32)},
            'Dense_1': {'kernel': rng.normal(size=(40, 10)).astype(np.float32)}}
  if not with_stats:
    return params
  return {'params': {**params, 'bn0': {'scale': np.ones(40, np.float32), 'bias': np.zeros(40, np.float32)}},
          'batch_stats': {'bn0': {'mean': rng.normal(size=40).astype(np.float32), 'var': np.ones(40, np.float32)}}}


@pytest.mark.parametrize('with_stats', [False, True])
@pytest.mark.parametrize('pruned,encoding', [(0.0, None), (0.5, 'bits'), (0.97, 'index')])
def test_the_sparse_form_round_trips_exactly(tmp_path, with_stats, pruned, encoding):
  rng = np.random.default_rng(0)
  theta = _theta(rng, with_stats)
  params = theta['params'] if with_stats else theta
  mask = {n: {'kernel': (rng.random(params[n]['kernel'].shape) >= pruned).astype(np.float32)}
          for n in ('Dense_0', 'Dense_1')}
  for n in mask:
    params[n]['kernel'] *= mask[n]['kernel']  # pruned weights exactly 0, as saved
  path = str(tmp_path / 'cycle1')
  sizes = sparse_params.write(path, theta, mask)
  with np.load(path + sparse_params.SPARSE_SUFFIX) as f:
    kinds = {k.split(':')[0] for k in f.files if k.endswith('Dense_0/kernel')}
  assert kinds == {'value', 'shape'} | ({encoding} if encoding else set())
  rebuilt, rebuilt_mask = sparse_params.read_sparse(path)
  jax.tree.map(np.testing.assert_array_equal, rebuilt, theta)
  assert jax.tree.structure(rebuilt) == jax.tree.structure(theta)
  jax.tree.map(np.testing.assert_array_equal, rebuilt_mask, mask)
  jax.tree.map(np.testing.assert_array_equal, sparse_params.read_mask(path), mask)
  kept = sum(int(m['kernel'].sum()) for m in mask.values())
  assert sizes['prunable_kept'] == kept and sizes['prunable_params'] == 300 * 40 + 400
  if pruned:
    assert sizes['sparse_bytes'] < sizes['raw_bytes'] * (1 - pruned + 0.1)
