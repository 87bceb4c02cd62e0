"""Compiled programs: no recompilation between DropNet cycles (masks are inputs, shapes never
change), and the program rewrites the training speed relies on compute the same values.

Compilations are counted with jax.monitoring's backend-compile event (every
XLA compilation, including small eager ops), snapshotted at each record.
"""

import contextlib

import functools

import chex
import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from dropnet_jax import models

from dropnet_jax.loop import dropnet
from dropnet_jax.loop.driver import RunIO
from dropnet_jax.models.layers import to_float
from dropnet_jax.config import DropNetConfig, TrainConfig
from dropnet_jax.training.lanes import Lanes
from dropnet_jax.training.trainer import DeviceData, Trainer, fit

# --batch_trials: every trial of a cycle as a lane of one program.
run_batched = functools.partial(dropnet.run_experiment, batch_trials=True)

BACKEND_COMPILE_EVENT = '/jax/core/compile/backend_compile_duration'
CONFIG = DropNetConfig(metrics=('min', 'random_layer'), fraction=0.2, floor=0.25,
                               train=TrainConfig(max_epochs=2, patience=1, eval_batch_size=128))


@contextlib.contextmanager
def compilations():
  names = []

  def listener(event, duration_secs, **kwargs):
    if event == BACKEND_COMPILE_EVENT:
      names.append(kwargs.get('fun_name'))

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield names
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)


def small(data):
  return DeviceData(*(jnp.asarray(a) for a in (data.train_images[:256], data.train_labels[:256],
                                                data.val_images[:128], data.val_labels[:128],
                                                data.test_images[:128], data.test_labels[:128])))


def test_run_seed_compiles_nothing_after_the_first_pruned_cycle(mnist_small):
  jax.clear_caches()  # the counts below start from nothing, whatever ran earlier in the session
  model = models.MLP(widths=(10, 10), num_classes=10)
  trainer = Trainer(model, CONFIG.train)
  data = small(mnist_small)
  snapshots = []
  with compilations() as names:
    records = dropnet.run_seed(model, (28, 28, 1), data, 0, CONFIG, trainer,
                               on_record=lambda r: snapshots.append((r['cycle'], len(names))),
                               log=lambda s: None, log_epochs=False)
  assert max(r['cycle'] for r in records) >= 4  # several cycles with changing masks
  first = next(n for cycle, n in snapshots if cycle >= 1)
  # Later on, only the drop rule of the next metric compiles (min is global, random_layer per layer).
  assert names[first:] == ['jit(drop_lowest_per_layer)'], (snapshots, names[first:])
  # One compiled epoch step for every mask, one evaluate per split shape (val and test share one).
  assert trainer.epoch_step._cache_size() == 1
  assert trainer.evaluate._cache_size() == 2


def test_batched_trials_compile_nothing_after_the_first_pruned_cycle(mnist_small):
  jax.clear_caches()
  model = models.MLP(widths=(10, 10), num_classes=10)
  trainer = Trainer(model, CONFIG.train)
  data = small(mnist_small)
  snapshots = []
  with compilations() as names:
    records = run_batched(model, (28, 28, 1), data, [0, 1], CONFIG, trainer, io=RunIO(
        on_record=lambda rs: snapshots.append((max(r['cycle'] for r in rs), len(names))), log=lambda s: None))
  cycles = {(r['seed'], r['metric']): r['cycle'] for r in records}
  assert max(cycles.values()) >= 4 and len(set(cycles.values())) > 1  # lanes stop at different cycles
  steady = [n for cycle, n in snapshots if cycle >= 1]
  assert len(set(steady)) == 1, snapshots
  # One lane count for the whole run (the dense cycle's seeds and the pruned cycles' trials alike):
  # the batched epoch step compiled once.
  assert names.count('jit(_epoch_step)') == 1, names


def test_new_mask_values_reuse_the_compiled_step(mnist_small):
  model = models.MLP(widths=(10,), num_classes=10)
  trainer = Trainer(model, TrainConfig(max_epochs=1))
  data = small(mnist_small)
  params = models.init_params(model, jax.random.key(0), (28, 28, 1))
  trainer.epoch_step(trainer.init_fit(params, models.full_masks(model), jax.random.key(0)), data)
  with compilations() as names:
    for k in range(3):
      masks = (jnp.asarray(np.arange(10) % (k + 2) != 0, jnp.float32),)
      state = trainer.epoch_step(trainer.init_fit(params, masks, jax.random.key(k)), data)
      trainer.evaluate(state.params, masks, data.val_images, data.val_labels)
  assert [n for n in names if n in ('jit(_epoch_step)', 'jit(_evaluate)')] == ['jit(_evaluate)']  # first eval call
  assert trainer.epoch_step._cache_size() == 1


# -- rewrites for speed: fast conv and max-pool gradients ------------------------------------------


class Convs(nn.Module):
  """Convolutions of several paddings and strides (ResNet's stride-2 3x3 and 1x1 convolutions included)."""

  @nn.compact
  def __call__(self, x, masks, train: bool = False):
    x = to_float(x)
    x = nn.Conv(4, (3, 3), padding='SAME')(x)
    x = nn.relu(nn.Conv(5, (2, 3), padding='VALID')(x))
    x = nn.Conv(3, (3, 3), padding=((2, 0), (1, 2)), use_bias=False)(x)
    x = nn.Conv(3, (3, 3), strides=2)(x)
    x = nn.Conv(4, (3, 3), strides=2, padding=((1, 1), (1, 1)))(x) + nn.Conv(4, (1, 1), strides=2)(x)
    return nn.Dense(10)(x.reshape(x.shape[0], -1)) * masks[0][0], ()


@pytest.mark.parametrize('model', [Convs(), models.ConvNet((4, 6), 10)], ids=['paddings', 'convnet'])
def test_fast_grads_equal_autodiff(model):
  from dropnet_jax.training.cpu_grads import with_fast_grads
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.integers(0, 256, (5, 12, 12, 1)), jnp.uint8)
  masks = (jnp.ones(4),) if isinstance(model, Convs) else models.full_masks(model)
  params = model.init(jax.random.key(0), x, masks)['params']
  apply = lambda p, x, m: model.apply({'params': p}, x, m)
  loss = lambda f: lambda p: jnp.sum(jnp.sin(f(p, x, masks)[0]))
  want = jax.jit(jax.grad(loss(apply)))(params)
  got = jax.jit(jax.grad(loss(with_fast_grads(apply))))(params)
  chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(with_fast_grads(apply)(params, x, masks)[0], apply(params, x, masks)[0])
  # The gradient program has only forward-style (NHWC, HWIO) stride-1 convolutions, with no dilation.
  def odd_convs(jaxpr):
    n = 0
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == 'conv_general_dilated':
        dn = eqn.params['dimension_numbers']
        p = eqn.params
        n += ((tuple(dn.lhs_spec), tuple(dn.rhs_spec)) != ((0, 3, 1, 2), (3, 2, 0, 1))
              or any(v != 1 for v in (*p['lhs_dilation'], *p['rhs_dilation'])))
      n += sum(odd_convs(sub) for sub in jax.extend.core.jaxprs_in_params(eqn.params))
    return n
  jaxpr = lambda f: jax.make_jaxpr(jax.grad(loss(f)))(params).jaxpr
  assert odd_convs(jaxpr(with_fast_grads(apply))) == 0
  assert odd_convs(jaxpr(apply)) > 2


def test_fast_max_pool_grads_pick_the_first_maximum_like_autodiff():
  from dropnet_jax.training.cpu_grads import with_fast_grads
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.integers(0, 3, (3, 8, 6, 4)), jnp.float32)  # many ties inside the windows
  r = jnp.asarray(rng.normal(size=(3, 8, 6, 4)), jnp.float32)
  for window in [(2, 2), (2, 3), (1, 2)]:
    pool = lambda x: nn.max_pool(x, window, strides=window)
    loss = lambda f: lambda x: jnp.sum(f(x) * r[:, :8 // window[0], :6 // window[1]])
    np.testing.assert_array_equal(with_fast_grads(pool)(x), pool(x))
    np.testing.assert_array_equal(jax.grad(loss(with_fast_grads(pool)))(x), jax.grad(loss(pool))(x))


# -- the fast shuffle -----------------------------------------------------------------------------


@pytest.mark.parametrize('n', [1, 31, 20428, 1 << 16, (1 << 16) + 3])
def test_shuffle_order_is_jax_random_permutation(n):
  from dropnet_jax.training.batches import shuffle_order
  for seed in range(2):
    key = jax.random.fold_in(jax.random.key(seed), n)
    want = np.asarray(jax.random.permutation(key, n))
    np.testing.assert_array_equal(np.asarray(jax.jit(shuffle_order, static_argnums=1)(key, n)), want)
