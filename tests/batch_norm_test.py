"""`layers.BatchNorm` against torch.nn.BatchNorm2d: training outputs and running statistics over several
steps (torch folds the unbiased batch variance into running_var), and eval mode."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dropnet_jax.models.layers import BatchNorm

torch = pytest.importorskip('torch')


@pytest.mark.parametrize('shape', [(4, 5, 6, 3), (2, 1, 1, 7), (9, 3)])
def test_matches_torch_batch_norm(shape):
  rng = np.random.default_rng(0)
  c = shape[-1]
  bn = BatchNorm()
  variables = bn.init(jax.random.key(0), jnp.zeros(shape))
  params = {'scale': jnp.asarray(rng.uniform(0.5, 1.5, c), jnp.float32),
            'bias': jnp.asarray(rng.normal(size=c), jnp.float32)}
  stats = variables['batch_stats']
  ref = (torch.nn.BatchNorm2d if len(shape) == 4 else torch.nn.BatchNorm1d)(c, momentum=0.1, eps=1e-5)
  with torch.no_grad():
    ref.weight.copy_(torch.from_numpy(np.array(params['scale'])))
    ref.bias.copy_(torch.from_numpy(np.array(params['bias'])))
  to_torch = (lambda a: torch.from_numpy(np.moveaxis(a, -1, 1).copy())) if len(shape) == 4 else torch.from_numpy
  from_torch = (lambda t: np.moveaxis(t.detach().numpy(), 1, -1)) if len(shape) == 4 else (lambda t: t.detach().numpy())
  ref.train()
  for step in range(4):
    x = (rng.normal(size=shape) * (step + 1) + step).astype(np.float32)
    y, updates = bn.apply({'params': params, 'batch_stats': stats}, jnp.asarray(x), mutable=['batch_stats'])
    stats = updates['batch_stats']
    np.testing.assert_allclose(np.asarray(y), from_torch(ref(to_torch(x))), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(stats['mean']), ref.running_mean.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(stats['var']), ref.running_var.numpy(), rtol=1e-5, atol=1e-6)
  ref.eval()
  x = rng.normal(size=shape).astype(np.float32)
  y = BatchNorm(use_running_average=True).apply({'params': params, 'batch_stats': stats}, jnp.asarray(x))
  np.testing.assert_allclose(np.asarray(y), from_torch(ref(to_torch(x))), rtol=1e-5, atol=1e-5)
