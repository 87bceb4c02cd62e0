"""Data parallelism: 2 (forced host) devices give the results of 1 device.

XLA_FLAGS must be set before jax is imported, so the comparison runs in a
subprocess that prints its measurements as JSON.
"""

import json
import os
import subprocess
import sys

import pytest

from conftest import MNIST_DIR

SCRIPT = r'''
import functools, json, sys
import jax, jax.numpy as jnp, numpy as np
from dropnet_jax import models
from dropnet_jax.input_pipeline import load_dataset
from dropnet_jax.config import DropNetConfig, TrainConfig
from dropnet_jax.training.lanes import Lanes
from dropnet_jax.training.trainer import DeviceData, Trainer, fit

out = {'devices': len(jax.devices())}
ds = load_dataset('mnist', sys.argv[1])
data = DeviceData(*(jnp.asarray(a) for a in (
    ds.train_images[:384], ds.train_labels[:384], ds.val_images[:300], ds.val_labels[:300],
    ds.test_images[:300], ds.test_labels[:300])))
one = jax.local_devices()[:1]
diff = lambda a, b: max(float(np.abs(np.asarray(x) - np.asarray(y)).max())
                        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
rel = lambda a, b: max(float(np.abs(np.asarray(x) - np.asarray(y)).max() / max(np.abs(np.asarray(y)).max(), 1e-12))
                       for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))

for name, model in [('fc', models.MLP((32, 16), 10)), ('conv', models.ConvNet((4, 4), 10))]:
  config = TrainConfig(max_epochs=2, patience=2, eval_batch_size=128)  # 300: 3 batches of 100 examples
  trainers = {'2': Trainer(model, config), '1': Trainer(model, config, devices=one)}
  params0 = models.init_params(model, jax.random.key(0), (28, 28, 1))
  masks = tuple(jnp.ones(w).at[1].set(0) for w in model.widths)
  res = {}
  for k, tr in trainers.items():
    d = tr.replicate(data)
    state = fit(tr.epoch_step, tr.init_fit(params0, masks, jax.random.key(1)), d)
    ev = tr.evaluate(state.params, masks, d.test_images, d.test_labels)
    res[k] = (state, ev)
  (s2, e2), (s1, e1) = res['2'], res['1']
  hlo = trainers['2'].epoch_step.lower(trainers['2'].init_fit(params0, masks, jax.random.key(1)), data).as_text()
  out[name] = {
      'mesh': trainers['2'].num_devices,
      'param_devices': len(jax.tree.leaves(s2.params)[0].sharding.device_set),
      'batch_split': "'data'" in hlo or '"data"' in hlo,  # the batch sharding constraint
      'epochs': [int(s2.epoch), int(s1.epoch)],
      'params_diff': diff(s2.params, s1.params), 'best_diff': diff(s2.best_params, s1.best_params),
      'losses': [[float(s.train_loss), float(s.val_loss), float(s.best_val_loss)] for s in (s2, s1)],
      'eval': [[float(e.loss), float(e.accuracy)] for e in (e2, e1)],
      'sums_rel': rel(e2.sums, e1.sums), 'best_sums_rel': rel(s2.best_sums, s1.best_sums),
  }

# Batched trials on 2 devices: the lanes are split over the devices.
from dropnet_jax.loop import dropnet
from dropnet_jax.loop.driver import RunIO

# --batch_trials: every trial of a cycle as a lane of one program.
run_batched = functools.partial(dropnet.run_experiment, batch_trials=True)
model = models.MLP((8,), 10)
config = DropNetConfig(metrics=('min',), fraction=0.5, floor=0.3, train=TrainConfig(max_epochs=2, patience=1))
tr2, tr1 = Trainer(model, config.train), Trainer(model, config.train, devices=one)
stack = lambda trees: jax.tree.map(lambda *xs: jnp.stack(xs), *trees)
params = stack([models.init_params(model, jax.random.key(s), (28, 28, 1)) for s in range(2)])
from dropnet_jax.training.lanes import Lanes
lanes = [Lanes(tr).epoch_step(Lanes(tr).init_fit(params, stack([models.full_masks(model)] * 2),
                                                 jnp.stack([jax.random.key(5)] * 2)), data) for tr in (tr2, tr1)]
out['batched_diff'] = diff(lanes[0].params, lanes[1].params)
# --batch_trials: one trial, padded to 2 lanes on 2 devices.
runs = [run_batched(model, (28, 28, 1), data, [0], config, tr, io=RunIO(log=lambda s: None)) for tr in (tr2, tr1)]
out['dropnet_masks_equal'] = [r['mask'] for r in runs[0]] == [r['mask'] for r in runs[1]]
out['dropnet_loss_diff'] = max(abs(a['test_loss'] - b['test_loss']) for a, b in zip(*runs))

try:
  Trainer(model, TrainConfig(batch_size=33))
  out['odd_batch_error'] = None
except ValueError as e:
  out['odd_batch_error'] = str(e)
print('RESULT ' + json.dumps(out))
'''


@pytest.fixture(scope='module')
def two_device_run():
  if not MNIST_DIR.is_dir():
    pytest.skip(f'real MNIST files not found at {MNIST_DIR}')
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2', JAX_PLATFORMS='cpu')
  proc = subprocess.run([sys.executable, '-c', SCRIPT, str(MNIST_DIR)], env=env, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith('RESULT ')][-1]
  return json.loads(line[len('RESULT '):])


@pytest.mark.parametrize('name', ['fc', 'conv'])
def test_two_devices_match_one(two_device_run, name):
  r = two_device_run[name]
  assert two_device_run['devices'] == 2
  assert r['mesh'] == 2 and r['param_devices'] == 2  # the step really ran on both devices...
  assert r['batch_split']  # ...with each batch split between them
  assert r['epochs'][0] == r['epochs'][1] == 2
  assert r['params_diff'] < 1e-5 and r['best_diff'] < 1e-5
  for a, b in zip(*r['losses']):
    assert abs(a - b) <= 1e-5 * max(1, abs(b))
  assert abs(r['eval'][0][0] - r['eval'][1][0]) < 1e-5 and r['eval'][0][1] == r['eval'][1][1]
  assert r['sums_rel'] < 1e-5 and r['best_sums_rel'] < 1e-5


def test_batched_trials_on_two_devices(two_device_run):
  assert two_device_run['batched_diff'] < 1e-5


def test_batched_dropnet_on_two_devices(two_device_run):
  assert two_device_run['dropnet_masks_equal']
  assert two_device_run['dropnet_loss_diff'] < 1e-5


def test_batch_size_not_divisible_by_devices_is_a_clear_error(two_device_run):
  msg = two_device_run['odd_batch_error']
  assert msg is not None and 'batch_size 33' in msg and '2 devices' in msg
