r"""Training speed of dropnet_jax: epoch time, model-epochs/s, FLOP rate, PyTorch ratio, memory.

  python -m experiments.benchmark --models=fc,conv,modelc --trials=1,15 --epochs=2 \
      --batch_size=32 --data_dir=../shared/data/mnist_subset --out=runs/benchmark

For every model and trial count it times the production programs: one trial
is `Trainer.epoch_step` (an SGD epoch plus the validation pass) and its pure
`Trainer.train_epoch`; T trials are `lanes.Lanes.epoch_step` with T lanes
(T seeds' θ0, distinct shuffles). Reported per configuration:

  * epoch time and model-epochs per second (trials / epoch time);
  * FLOPs per epoch: forward+backward matmul/conv FLOPs counted from the
    jaxpr of one training step (2·M·N·K per dot_general, 2·out·K per conv) times
    the steps of an epoch, plus the forward FLOPs of the validation pass, and
    XLA's cost analysis of one compiled step for comparison;
  * the achieved FLOP rate as a fraction of this machine's float32 matmul rate,
    measured in the same run (a jitted 4096^2 jnp matmul, best of 5);
  * the ratio of the PyTorch epoch time (tests.torch_reference: same
    models, SGD, batch size and data; one trial) to the JAX train epoch;
  * peak host memory (getrusage maxrss) and device memory_stats when available.

Data: Model A (fc) and B (conv) use the MNIST subset in --data_dir (random
MNIST-shaped data if it is missing); Model C (modelc) random CIFAR-shaped uint8
data (32x32x3). On CPU, B and C train on reduced numbers of examples
(--conv_examples, --modelc_examples) so the whole benchmark takes minutes; the
output says so. Epoch times are the best of --epochs timed epochs after one
warm-up (compilation) epoch. The machine may be shared: timings are noisy.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import sys
import time
from typing import Any

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from dropnet_jax import models
from dropnet_jax.config import TrainConfig
from dropnet_jax.training.lanes import Lanes
from dropnet_jax.training.trainer import DeviceData, Trainer
from experiments import common  # noqa: F401 (the shared flags: --batch_size, --data_dir for A and B, --out)

FLAGS = flags.FLAGS
flags.DEFINE_list('models', 'fc,conv,modelc', 'Models: fc (A), conv (B), modelc (C).')
flags.DEFINE_list('trials', '1,15', 'Trial counts to time (1 = Trainer.epoch_step, T>1 = Lanes.epoch_step).')
flags.DEFINE_integer('epochs', 2, 'Timed epochs per configuration (after one warm-up epoch); the best is reported.')
flags.DEFINE_integer('fc_examples', 0, 'Training examples for Model A (0: all of the MNIST subset).')
flags.DEFINE_integer('conv_examples', 2048, 'Training examples for Model B (reduced for CPU; 0: all).')
flags.DEFINE_integer('modelc_examples', 256, 'Training examples for Model C (random CIFAR-shaped data).')
flags.DEFINE_bool('torch', True, 'Time the PyTorch reference too (when torch is installed).')

VAL_FRACTION = 0.1


# -- FLOP counting ---------------------------------------------------------------------------------


def _dot_flops(eqn) -> int:
  (lc, _), (lb, _) = eqn.params['dimension_numbers']
  lhs = eqn.invars[0].aval.shape
  contracted = int(np.prod([lhs[d] for d in lc])) if lc else 1
  return 2 * contracted * int(np.prod(eqn.outvars[0].aval.shape))


def _conv_flops(eqn) -> int:
  rhs = eqn.invars[1].aval.shape  # kernel
  dn = eqn.params['dimension_numbers']
  in_feature_dim = dn.rhs_spec[1]
  spatial = [rhs[d] for d in dn.rhs_spec[2:]]
  per_output = rhs[in_feature_dim] * int(np.prod(spatial))
  return 2 * per_output * int(np.prod(eqn.outvars[0].aval.shape))


def matmul_conv_flops(jaxpr) -> int:
  """Sum of dot_general and conv FLOPs in a (closed) jaxpr, recursing into sub-jaxprs."""
  total = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == 'dot_general':
      total += _dot_flops(eqn)
    elif eqn.primitive.name == 'conv_general_dilated':
      total += _conv_flops(eqn)
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      total += matmul_conv_flops(sub)
  return total


def step_flops(model, params, masks, image_shape, batch_size) -> dict[str, float]:
  """FLOPs of one SGD step (forward+backward) and one forward pass of `batch_size` examples."""
  x = jnp.zeros((batch_size, *image_shape), jnp.uint8)
  y = jnp.zeros((batch_size,), jnp.int32)

  def loss(p):
    logits, _ = model.apply({'params': p}, x, masks)
    return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, y[:, None], -1)[:, 0])

  def train_step(p):
    g = jax.grad(loss)(p)
    return jax.tree.map(lambda a, b: a - 0.1 * b, p, g)

  forward = lambda p: model.apply({'params': p}, x, masks)[0]
  out = {'train_step': matmul_conv_flops(jax.make_jaxpr(train_step)(params).jaxpr),
         'forward': matmul_conv_flops(jax.make_jaxpr(forward)(params).jaxpr)}
  try:
    cost = jax.jit(train_step).lower(params).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    out['train_step_xla'] = float(cost.get('flops', float('nan')))
  except Exception:  # cost analysis is optional and backend dependent
    out['train_step_xla'] = float('nan')
  return out


def matmul_rate(n: int = 4096, repeats: int = 5) -> float:
  """This machine's float32 matmul rate in FLOP/s (jitted n x n @ n x n, best of `repeats`)."""
  f = jax.jit(lambda a, b: a @ b)
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  f(a, b).block_until_ready()
  best = float('inf')
  for _ in range(repeats):
    t = time.perf_counter()
    f(a, b).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2 * n ** 3 / best


# -- data -------------------------------------------------------------------------------------------


def split(images, labels, n_train):
  n_val = max(int(round(VAL_FRACTION * n_train)), FLAGS.batch_size)
  images, labels = images[:n_train + n_val], labels[:n_train + n_val].astype(np.int32)
  a = n_train
  return DeviceData(*(jnp.asarray(v) for v in (images[:a], labels[:a], images[a:], labels[a:],
                                                images[a:], labels[a:])))


def load_data(name: str) -> tuple[DeviceData, str]:
  rng = np.random.default_rng(0)
  if name == 'modelc':
    n = FLAGS.modelc_examples
    images = rng.integers(0, 256, (n + max(int(round(VAL_FRACTION * n)), FLAGS.batch_size), 32, 32, 3), np.uint8)
    labels = rng.integers(0, 10, len(images))
    return split(images, labels, n), f'random CIFAR-shaped uint8 data, {n} training examples (reduced for CPU)'
  wanted = FLAGS.fc_examples if name == 'fc' else FLAGS.conv_examples
  if FLAGS.data_dir and os.path.isdir(FLAGS.data_dir):
    from dropnet_jax.input_pipeline import load_dataset
    ds = load_dataset('mnist', FLAGS.data_dir)
    n = len(ds.train_labels) if not wanted else min(wanted, len(ds.train_labels))
    data = DeviceData(*(jnp.asarray(v) for v in (ds.train_images[:n], ds.train_labels[:n].astype(np.int32),
                                                  ds.val_images, ds.val_labels.astype(np.int32),
                                                  ds.test_images, ds.test_labels.astype(np.int32))))
    note = f'MNIST subset, {n} of {len(ds.train_labels)} training examples'
    return data, note + (' (reduced for CPU)' if n < len(ds.train_labels) else '')
  n = wanted or 20428
  images = rng.integers(0, 256, (n + max(int(round(VAL_FRACTION * n)), FLAGS.batch_size), 28, 28, 1), np.uint8)
  return split(images, rng.integers(0, 10, len(images)), n), f'random MNIST-shaped data, {n} training examples'


# -- timing -----------------------------------------------------------------------------------------


def best_time(fn, repeats: int) -> float:
  jax.block_until_ready(fn())  # warm-up: compilation and first run
  best = float('inf')
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    best = min(best, time.perf_counter() - t)
  return best


def stack(trees):
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def time_jax(name, model, data, image_shape, trials: int) -> dict[str, Any]:
  config = TrainConfig(batch_size=FLAGS.batch_size, max_epochs=10 ** 6, patience=10 ** 6)
  masks = models.full_masks(model)
  out: dict[str, Any] = {'model': name, 'trials': trials}
  if trials == 1:
    # One trial on one device; with several (host) devices also split over all of them (data parallel).
    trainer = Trainer(model, config, devices=jax.local_devices()[:1])
    params = models.init_params(model, jax.random.key(0), image_shape)
    opt_state = trainer.tx.init(params)
    state = trainer.init_fit(params, masks, jax.random.key(1))
    out['train_epoch_s'] = best_time(lambda: trainer.train_epoch(
        params, opt_state, masks, data.train_images, data.train_labels, jax.random.key(2)), FLAGS.epochs)
    out['epoch_s'] = best_time(lambda: trainer.epoch_step(state, data), FLAGS.epochs)
    out['lanes_per_chunk'] = 1
    if len(jax.local_devices()) > 1 and FLAGS.batch_size % len(jax.local_devices()) == 0:
      parallel = Trainer(model, config)
      pstate = parallel.init_fit(params, masks, jax.random.key(1))
      out['data_parallel_epoch_s'] = best_time(lambda: parallel.epoch_step(pstate, data), FLAGS.epochs)
      out['data_parallel_devices'] = parallel.num_devices
    out['devices'] = 1
  else:
    runner = Lanes(Trainer(model, config))
    # As the driver does: lanes padded to a multiple of the device count with done lanes.
    lanes = runner.pad(trials)
    params = stack([models.init_params(model, jax.random.key(s % trials), image_shape) for s in range(lanes)])
    state = runner.init_fit(params, stack([masks] * lanes), jax.random.split(jax.random.key(1), lanes))
    state = state._replace(done=jnp.arange(lanes) >= trials)
    out['lanes'] = lanes
    out['epoch_s'] = best_time(lambda: runner.epoch_step(state, data), FLAGS.epochs)
    out['devices'] = runner.trainer.num_devices
    out['lanes_per_chunk'] = runner.lanes_per_chunk
  out['model_epochs_per_s'] = trials / out['epoch_s']
  return out


def time_torch(name, data: DeviceData, image_shape, widths) -> dict[str, Any] | None:
  """One PyTorch training epoch (same model, SGD, batch size, data); None without torch."""
  try:
    import torch
  except ImportError:
    return None
  images = torch.from_numpy(np.array(data.train_images))
  labels = torch.from_numpy(np.array(data.train_labels).astype(np.int64))
  order = np.random.default_rng(0).permutation(len(labels))
  from tests.torch_reference import models as tmodels
  from tests.torch_reference import train as ttrain
  model = tmodels.create_model(name, widths, 10, image_shape)
  masks = tmodels.full_masks(model)
  trainer = ttrain.Trainer(model, TrainConfig(batch_size=FLAGS.batch_size))
  opt = torch.optim.SGD(model.parameters(), lr=0.1)
  run = lambda o: trainer.train_epoch(opt, masks, images, labels, o)
  run(order[:FLAGS.batch_size * 4])  # warm-up
  best = float('inf')
  for _ in range(FLAGS.epochs):  # best of as many epochs as JAX gets
    t = time.perf_counter()
    run(order)
    best = min(best, time.perf_counter() - t)
  return {'torch_train_epoch_s': best, 'torch_threads': torch.get_num_threads(),
          'torch_version': torch.__version__}


def memory() -> dict[str, Any]:
  out = {'host_peak_rss_mib': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
  try:
    stats = jax.local_devices()[0].memory_stats()
  except Exception:
    stats = None
  if stats:
    out['device_peak_bytes_in_use'] = stats.get('peak_bytes_in_use')
    out['device_bytes_limit'] = stats.get('bytes_limit')
  return out


def main(argv):
  del argv
  trial_counts = [int(t) for t in FLAGS.trials]
  names = list(FLAGS.models)
  for name in names:
    if name not in models.MODELS:
      sys.exit(f'error: unknown model {name!r}; choose from {sorted(models.MODELS)}')
  rate = matmul_rate()
  machine = {'platform': platform.platform(), 'cpu_count': os.cpu_count(), 'jax': jax.__version__,
             'devices': [str(d) for d in jax.devices()], 'matmul_f32_flops_per_s': rate}
  print(f'{len(jax.devices())} x {jax.devices()[0].platform} device(s), {os.cpu_count()} CPU cores; '
        f'measured float32 matmul rate (4096^2, best of 5): {rate / 1e9:.1f} GFLOP/s')
  print('Timings on a shared machine are noisy; each figure is the best of '
        f'{FLAGS.epochs} epoch(s) after a warm-up epoch.')
  results, notes = [], []
  for name in names:
    data, note = load_data(name)
    notes.append(f'{name}: {note}')
    print(f'\n{name}: {note}; val {data.val_labels.shape[0]} examples; batch {FLAGS.batch_size}')
    image_shape = tuple(data.train_images.shape[1:])
    model = models.create_model(name, None, 10)
    params = models.init_params(model, jax.random.key(0), image_shape)
    flops = step_flops(model, params, models.full_masks(model), image_shape, FLAGS.batch_size)
    n_train, n_val = data.train_labels.shape[0], data.val_labels.shape[0]
    steps = -(-n_train // FLAGS.batch_size)
    train_epoch_flops = steps * flops['train_step']
    epoch_flops = train_epoch_flops + n_val * flops['forward'] // FLAGS.batch_size  # epoch_step: + validation
    torch_res = time_torch(name, data, image_shape, model.widths) if FLAGS.torch else None
    for trials in trial_counts:
      r = time_jax(name, model, data, image_shape, trials)
      r.update(examples=n_train, steps_per_epoch=steps, train_epoch_flops=train_epoch_flops,
               epoch_flops=epoch_flops, train_step_flops_xla_cost_analysis=flops['train_step_xla'],
               train_epoch_flops_xla_cost_analysis=steps * flops['train_step_xla'])
      r['achieved_flops_per_s'] = trials * epoch_flops / r['epoch_s']
      r['fraction_of_matmul_rate'] = r['achieved_flops_per_s'] / rate
      if trials == 1:
        r['train_achieved_flops_per_s'] = train_epoch_flops / r['train_epoch_s']
        r['train_fraction_of_matmul_rate'] = r['train_achieved_flops_per_s'] / rate
        if torch_res:
          r.update(torch_res)
          r['speedup_vs_torch'] = torch_res['torch_train_epoch_s'] / r['train_epoch_s']
      r.update(memory())
      results.append(r)
      line = (f'  {trials:3d} trial(s): epoch {r["epoch_s"] * 1e3:9.1f} ms  {r["model_epochs_per_s"]:8.2f} model-epochs/s  '
              f'{r["achieved_flops_per_s"] / 1e9:6.1f} GFLOP/s = {100 * r["fraction_of_matmul_rate"]:5.1f}% of matmul')
      if trials == 1:
        line += (f' | train epoch {r["train_epoch_s"] * 1e3:.1f} ms, {r["train_achieved_flops_per_s"] / 1e9:.1f} GFLOP/s'
                 f' = {100 * r["train_fraction_of_matmul_rate"]:.1f}%')
        if 'speedup_vs_torch' in r:
          line += f' | torch {r["torch_train_epoch_s"] * 1e3:.0f} ms: {r["speedup_vs_torch"]:.1f}x'
        if 'data_parallel_epoch_s' in r:
          line += f' | data-parallel over {r["data_parallel_devices"]} devices: epoch {r["data_parallel_epoch_s"] * 1e3:.0f} ms'
      else:
        line += f' | {r["devices"]} device(s), lanes per chunk {r["lanes_per_chunk"]}'
      print(line + f' | peak RSS {r["host_peak_rss_mib"]:.0f} MiB')
    print(f'  FLOPs per train epoch (fwd+bwd matmul/conv, from the jaxpr): {train_epoch_flops / 1e9:.2f} G '
          f'(XLA cost analysis: {steps * flops["train_step_xla"] / 1e9:.2f} G); with validation: {epoch_flops / 1e9:.2f} G')
  report = {'machine': machine, 'batch_size': FLAGS.batch_size, 'timed_epochs': FLAGS.epochs, 'data': notes,
            'note': 'shared machine: timings are noisy; best of the timed epochs after a warm-up epoch',
            'results': results}
  path = os.path.join(FLAGS.out, 'benchmark.json')
  os.makedirs(FLAGS.out, exist_ok=True)
  with open(path, 'w') as f:
    json.dump(report, f, indent=2)
  print(f'\nwrote {path}')


def run() -> None:
  """The `dropnet-benchmark` console command (pyproject.toml [project.scripts])."""
  app.run(main)


if __name__ == '__main__':
  run()
