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
MNIST-shaped data without --data_dir; a --data_dir that does not exist is
refused); Model C (modelc) random CIFAR-shaped uint8 data (32x32x3). On CPU, B and C train on reduced numbers of examples
(--conv_examples, --modelc_examples) so the whole benchmark takes minutes; the
output says so. Epoch times are the best of --epochs timed epochs after one
warm-up (compilation) epoch. The machine may be shared: timings are noisy.

Writes <out>/benchmark.json (and <out>/config.json, which `--config` loads
back). Every setting is checked, and --out too, before anything is timed;
the PyTorch part (--torch, the default) needs torch and this source checkout
(tests/torch_reference): without them the benchmark stops at once (--notorch
times JAX alone).
"""

from __future__ import annotations

from dropnet_jax.cli import entry  # first: applies --host_devices before jax is imported

import dataclasses
import json
import os
import platform
import resource
import time
from typing import Any

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np

from dropnet_jax import models
from dropnet_jax.config import TrainConfig
from dropnet_jax.settings import setting
from dropnet_jax.training.lanes import Lanes
from dropnet_jax.training.trainer import DeviceData, Trainer

VAL_FRACTION = 0.1
BENCH_MODELS = ('fc', 'conv', 'modelc')  # the models the PyTorch twin has too


@dataclasses.dataclass(frozen=True)
class BenchmarkConfig:
  """What the benchmark times (see the module docstring)."""
  models: tuple[str, ...] = setting(BENCH_MODELS, 'Models: fc (A), conv (B), modelc (C).', flag='models',
                                    choices=BENCH_MODELS)
  trials: tuple[int, ...] = setting((1, 15), 'Trial counts to time (1 = Trainer.epoch_step, T>1 = '
                                    'Lanes.epoch_step).', flag='trials')
  epochs: int = setting(2, 'Timed epochs per configuration (after one warm-up epoch); the best is reported.',
                        flag='epochs')
  batch_size: int = setting(32, 'Batch size.', flag='batch_size')
  data_dir: str | None = setting(None, 'The MNIST subset (a directory of the four IDX files) Models A and B train '
                                 'on (default: random MNIST-shaped data).', flag='data_dir', result=False)
  fc_examples: int = setting(0, 'Training examples for Model A (0: all of the MNIST subset).', flag='fc_examples')
  conv_examples: int = setting(2048, 'Training examples for Model B (reduced for CPU; 0: all).',
                               flag='conv_examples')
  modelc_examples: int = setting(256, 'Training examples for Model C (random CIFAR-shaped data).',
                                 flag='modelc_examples')
  torch: bool = setting(True, 'Time the PyTorch reference too (needs torch and a source checkout: '
                        'tests/torch_reference).', flag='torch')

  def validate(self) -> None:
    """Raises ValueError naming the setting."""
    for name in ('models', 'trials'):
      values = getattr(self, name)
      if not values:
        raise ValueError(f'{name}: give at least one')
      if len(set(values)) != len(values):
        raise ValueError(f'{name}: duplicates in {list(values)}')
    for name in self.models:
      if name not in BENCH_MODELS:
        raise ValueError(f'models: {name!r} is not one of {", ".join(BENCH_MODELS)}')
    if min(self.trials) < 1:
      raise ValueError(f'trials must be positive, got {list(self.trials)}')
    for name in ('epochs', 'batch_size', 'modelc_examples'):
      if getattr(self, name) < 1:
        raise ValueError(f'{name} must be >= 1, got {getattr(self, name)}')
    for name in ('fc_examples', 'conv_examples'):
      if getattr(self, name) < 0:
        raise ValueError(f'{name} must be >= 0 (0: all), got {getattr(self, name)}')
    if self.data_dir is not None and not os.path.isdir(self.data_dir):
      raise ValueError(f'data_dir: {self.data_dir} does not exist or is not a directory')


CONFIG = entry.define(BenchmarkConfig(), 'benchmark', out_help='Output directory: <out>/benchmark.json.')


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


def split(images, labels, n_train, batch_size):
  n_val = max(int(round(VAL_FRACTION * n_train)), batch_size)
  images, labels = images[:n_train + n_val], labels[:n_train + n_val].astype(np.int32)
  a = n_train
  return DeviceData(*(jnp.asarray(v) for v in (images[:a], labels[:a], images[a:], labels[a:],
                                                images[a:], labels[a:])))


def load_data(config: BenchmarkConfig) -> dict[str, tuple[DeviceData, str]]:
  """Every model's data and a note on it, loaded before anything is timed (a bad --data_dir stops here)."""
  rng = np.random.default_rng(0)
  mnist = None
  if config.data_dir is not None and {'fc', 'conv'} & set(config.models):
    from dropnet_jax.input_pipeline import load_dataset
    mnist = load_dataset('mnist', config.data_dir)  # DataError (a ValueError) names a missing or bad file
  out = {}
  for name in config.models:
    if name == 'modelc':
      n = config.modelc_examples
      images = rng.integers(0, 256, (n + max(int(round(VAL_FRACTION * n)), config.batch_size), 32, 32, 3), np.uint8)
      out[name] = (split(images, rng.integers(0, 10, len(images)), n, config.batch_size),
                   f'random CIFAR-shaped uint8 data, {n} training examples (reduced for CPU)')
      continue
    wanted = config.fc_examples if name == 'fc' else config.conv_examples
    if mnist is not None:
      ds = mnist
      n = len(ds.train_labels) if not wanted else min(wanted, len(ds.train_labels))
      data = DeviceData(*(jnp.asarray(v) for v in (ds.train_images[:n], ds.train_labels[:n].astype(np.int32),
                                                    ds.val_images, ds.val_labels.astype(np.int32),
                                                    ds.test_images, ds.test_labels.astype(np.int32))))
      note = f'MNIST subset, {n} of {len(ds.train_labels)} training examples'
      out[name] = (data, note + (' (reduced for CPU)' if n < len(ds.train_labels) else ''))
      continue
    n = wanted or 20428
    images = rng.integers(0, 256, (n + max(int(round(VAL_FRACTION * n)), config.batch_size), 28, 28, 1), np.uint8)
    out[name] = (split(images, rng.integers(0, 10, len(images)), n, config.batch_size),
                 f'random MNIST-shaped data (no --data_dir), {n} training examples')
  return out


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


def time_jax(name, model, data, image_shape, trials: int, bench: BenchmarkConfig) -> dict[str, Any]:
  config = TrainConfig(batch_size=bench.batch_size, max_epochs=10 ** 6, patience=10 ** 6)
  masks = models.full_masks(model)
  out: dict[str, Any] = {'model': name, 'trials': trials}
  if trials == 1:
    # One trial on one device; with several (host) devices also split over all of them (data parallel).
    trainer = Trainer(model, config, devices=jax.local_devices()[:1])
    params = models.init_params(model, jax.random.key(0), image_shape)
    opt_state = trainer.tx.init(params)
    state = trainer.init_fit(params, masks, jax.random.key(1))
    out['train_epoch_s'] = best_time(lambda: trainer.train_epoch(
        params, opt_state, masks, data.train_images, data.train_labels, jax.random.key(2)), bench.epochs)
    out['epoch_s'] = best_time(lambda: trainer.epoch_step(state, data), bench.epochs)
    out['lanes_per_chunk'] = 1
    if len(jax.local_devices()) > 1 and bench.batch_size % len(jax.local_devices()) == 0:
      parallel = Trainer(model, config)
      pstate = parallel.init_fit(params, masks, jax.random.key(1))
      out['data_parallel_epoch_s'] = best_time(lambda: parallel.epoch_step(pstate, data), bench.epochs)
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
    out['epoch_s'] = best_time(lambda: runner.epoch_step(state, data), bench.epochs)
    out['devices'] = runner.trainer.num_devices
    out['lanes_per_chunk'] = runner.lanes_per_chunk
  out['model_epochs_per_s'] = trials / out['epoch_s']
  return out


def time_torch(name, data: DeviceData, image_shape, widths, bench: BenchmarkConfig) -> dict[str, Any]:
  """One PyTorch training epoch (same model, SGD, batch size, data); `require_torch_twin` has run."""
  import torch
  from tests.torch_reference import models as tmodels
  from tests.torch_reference import train as ttrain
  images = torch.from_numpy(np.array(data.train_images))
  labels = torch.from_numpy(np.array(data.train_labels).astype(np.int64))
  order = np.random.default_rng(0).permutation(len(labels))
  model = tmodels.create_model(name, widths, 10, image_shape)
  masks = tmodels.full_masks(model)
  trainer = ttrain.Trainer(model, TrainConfig(batch_size=bench.batch_size))
  opt = torch.optim.SGD(model.parameters(), lr=0.1)
  run = lambda o: trainer.train_epoch(opt, masks, images, labels, o)
  run(order[:bench.batch_size * 4])  # warm-up
  best = float('inf')
  for _ in range(bench.epochs):  # best of as many epochs as JAX gets
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


def line(r: dict[str, Any]) -> str:
  """One configuration's figures as a line of the printed report."""
  text = (f'  {r["trials"]:3d} trial(s): epoch {r["epoch_s"] * 1e3:9.1f} ms  {r["model_epochs_per_s"]:8.2f} '
          f'model-epochs/s  {r["achieved_flops_per_s"] / 1e9:6.1f} GFLOP/s = '
          f'{100 * r["fraction_of_matmul_rate"]:5.1f}% of matmul')
  if r['trials'] == 1:
    text += (f' | train epoch {r["train_epoch_s"] * 1e3:.1f} ms, {r["train_achieved_flops_per_s"] / 1e9:.1f} GFLOP/s'
             f' = {100 * r["train_fraction_of_matmul_rate"]:.1f}%')
    if 'speedup_vs_torch' in r:
      text += f' | torch {r["torch_train_epoch_s"] * 1e3:.0f} ms: {r["speedup_vs_torch"]:.1f}x'
    if 'data_parallel_epoch_s' in r:
      text += (f' | data-parallel over {r["data_parallel_devices"]} devices: epoch '
               f'{r["data_parallel_epoch_s"] * 1e3:.0f} ms')
  else:
    text += f' | {r["devices"]} device(s), lanes per chunk {r["lanes_per_chunk"]}'
  return text + f' | peak RSS {r["host_peak_rss_mib"]:.0f} MiB'


def benchmark(bench: BenchmarkConfig, all_data: dict[str, tuple[DeviceData, str]]) -> dict[str, Any]:
  """Times every model x trial count (printing a line each); returns the report benchmark.json holds."""
  rate = matmul_rate()
  machine = {'platform': platform.platform(), 'cpu_count': os.cpu_count(), 'jax': jax.__version__,
             'devices': [str(d) for d in jax.devices()], 'matmul_f32_flops_per_s': rate}
  print(f'{len(jax.devices())} x {jax.devices()[0].platform} device(s), {os.cpu_count()} CPU cores; '
        f'measured float32 matmul rate (4096^2, best of 5): {rate / 1e9:.1f} GFLOP/s')
  print('Timings on a shared machine are noisy; each figure is the best of '
        f'{bench.epochs} epoch(s) after a warm-up epoch.')
  results, notes = [], []
  batch = bench.batch_size
  for name, (data, note) in all_data.items():
    notes.append(f'{name}: {note}')
    print(f'\n{name}: {note}; val {data.val_labels.shape[0]} examples; batch {batch}')
    image_shape = tuple(data.train_images.shape[1:])
    model = models.create_model(name, None, 10)
    params = models.init_params(model, jax.random.key(0), image_shape)
    flops = step_flops(model, params, models.full_masks(model), image_shape, batch)
    n_train, n_val = data.train_labels.shape[0], data.val_labels.shape[0]
    steps = -(-n_train // batch)
    train_epoch_flops = steps * flops['train_step']
    epoch_flops = train_epoch_flops + n_val * flops['forward'] // batch  # epoch_step: + validation
    torch_res = time_torch(name, data, image_shape, model.widths, bench) if bench.torch else None
    for trials in bench.trials:
      r = time_jax(name, model, data, image_shape, trials, bench)
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
      print(line(r), flush=True)
    print(f'  FLOPs per train epoch (fwd+bwd matmul/conv, from the jaxpr): {train_epoch_flops / 1e9:.2f} G '
          f'(XLA cost analysis: {steps * flops["train_step_xla"] / 1e9:.2f} G); with validation: '
          f'{epoch_flops / 1e9:.2f} G')
  return {'machine': machine, 'batch_size': batch, 'timed_epochs': bench.epochs, 'data': notes,
          'note': 'shared machine: timings are noisy; best of the timed epochs after a warm-up epoch',
          'results': results}


def main(argv):
  from dropnet_jax.runs.run_dir import RunDir  # here: --help does not need it
  del argv
  try:
    bench = entry.config(CONFIG)  # every setting, --data_dir's existence included
    run_dir = RunDir(entry.FLAGS.out, 'benchmark', bench)
    run_dir.check()  # --out: a file, read-only, another run's directory
    if bench.torch:
      entry.require_torch_twin('--torch (the default; --notorch times JAX alone)')
    all_data = load_data(bench)
  except ValueError as e:  # includes input_pipeline.DataError
    entry.fail(e)
  with run_dir.open(resume_hint='benchmark.json was not written; rerun the command to time again'):
    report = benchmark(bench, all_data)
    path = run_dir.write_text('benchmark.json', json.dumps(report, indent=2))
  print(f'\nwrote {path}')


def run() -> None:
  """The `dropnet-benchmark` console command (pyproject.toml [project.scripts])."""
  entry.run(main)


if __name__ == '__main__':
  run()
