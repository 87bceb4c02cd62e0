r"""Seconds per prune-and-retrain round: dropnet_jax against PyTorch's prune-and-retrain loop.

  python -m experiments.magnitude_bench --model=fc --widths=40,40 --dataset=mnist \
      --data_dir=../shared/data/mnist_subset --epochs=2 --rounds=3 --out=runs/magnitude_bench_fc40

Writes <out>/bench.json (the figures below) and <out>/config.json. Needs
PyTorch and this source checkout (tests/torch_reference); without them, or
with an unusable --out, it stops before any work.

One round is what iterative magnitude pruning repeats: prune `--amount` of the
remaining weights by global |w| (every Dense/Conv kernel, the classifier's
included, biases not: `dropnet_jax.loop.magnitude`'s default selection), then
`--epochs` epochs of plain SGD on the masked network. Both sides start from
the same θ0 (the Flax init copied into the torch twin,
`tests.torch_reference`) and see the same batches (each epoch's order is
`dropnet_jax.training.batches.shuffle_order` of the same key; the last batch is the
remainder):

  * JAX: `weight_criteria.global_l1` (jitted, the fraction static) and
    `Trainer(model, config, weight_masks=True).train_epoch` (one compiled
    scan per epoch, the optimiser update masked by `masked_updates`);
  * PyTorch: `prune.global_unstructured(..., pruning_method=prune.L1Unstructured,
    amount)` (the mask applied by torch's forward pre-hook, later rounds
    through its PruningContainer on the still-unpruned entries) and an eager
    SGD loop (forward, cross-entropy, backward, `optim.SGD.step`).

Neither side evaluates inside a round (no validation pass, no early
stopping): only the round's own work is timed. Round 1 is the warm-up and is
reported apart (for JAX it includes tracing and compilation, which is also
timed on its own, ahead of time, with `lower().compile()`); rounds 2..R+1 are
timed. After the rounds both networks' masks are compared and their test
accuracies reported, as evidence that the two loops do the same work: the
first round prunes the same weights and trains to within float rounding; a
later round can prune a different weight whose magnitude sits within rounding
of the threshold (the two libraries sum in different orders), after which the
runs drift apart while their accuracies stay alike.

torch's own scores would be `module.weight`, which the forward pre-hook last
recomputed *before* the final SGD step of the previous round, i.e. one step
stale (a loop that evaluates between rounds refreshes it); the current
`weight_orig * weight_mask` is passed as `importance_scores`, so both sides
score the same weights. The machine may be shared: figures are wall-clock and
noisy, one run each; torch's intra-op threads (`--torch_threads`) matter on
an oversubscribed machine.
"""

from __future__ import annotations

from dropnet_jax.cli import entry  # first: applies --host_devices before jax is imported

import dataclasses
import json
import math
import os
import time
from typing import Any

import jax
import numpy as np

from dropnet_jax.config import DataConfig, ModelConfig
from dropnet_jax.settings import setting

TWIN_MODELS = ('fc', 'conv', 'modelc')
BENCH_DATASETS = ('digits', 'mnist', 'cifar10')


@dataclasses.dataclass(frozen=True)
class MagnitudeBenchConfig:
  """The prune-and-retrain rounds both sides time (see the module docstring)."""
  model: ModelConfig = ModelConfig()
  data: DataConfig = DataConfig()
  epochs: int = setting(2, 'Training epochs per round.', flag='epochs')
  rounds: int = setting(3, 'Timed rounds, after one warm-up round.', flag='rounds')
  amount: float = setting(0.2, 'Fraction of the remaining weights pruned per round, in (0, 1).', flag='amount')
  lr: float = setting(0.1, 'SGD learning rate.', flag='lr')
  batch_size: int = setting(32, 'Batch size.', flag='batch_size')
  seed: int = setting(0, 'Seed of θ0 and of the batch order.', flag='seed')
  torch_threads: int = setting(0, "torch.set_num_threads (0: torch's default).", flag='torch_threads')

  def validate(self) -> None:
    """Raises ValueError naming the setting."""
    if self.model.name not in TWIN_MODELS:
      raise ValueError(f'model: the PyTorch reference has {", ".join(TWIN_MODELS)}, not {self.model.name}')
    if self.data.dataset not in BENCH_DATASETS:
      raise ValueError(f'dataset: one of {", ".join(BENCH_DATASETS)}, not {self.data.dataset}')
    for name in ('epochs', 'rounds', 'batch_size'):
      if getattr(self, name) < 1:
        raise ValueError(f'{name} must be >= 1, got {getattr(self, name)}')
    if not 0 < self.amount < 1:
      raise ValueError(f'amount must be in (0, 1), got {self.amount}')
    if not (math.isfinite(self.lr) and self.lr > 0):
      raise ValueError(f'lr must be a positive number, got {self.lr}')
    if self.torch_threads < 0:
      raise ValueError(f'torch_threads must be >= 0, got {self.torch_threads}')


CONFIG = entry.define(MagnitudeBenchConfig(), 'magnitude_bench',
                      out_help='Output directory (a run directory): <out>/bench.json and config.json.')


def epoch_keys(seed: int, rounds: int, epochs: int) -> list[list[jax.Array]]:
  """The shuffle key of every (round, epoch); both sides derive their batch order from it."""
  base = jax.random.key(seed + 1)
  return [[jax.random.fold_in(jax.random.fold_in(base, r), e) for e in range(epochs)] for r in range(rounds)]


# -- JAX ------------------------------------------------------------------------------------------


def jax_rounds(model, dataset, theta0, keys, *, amount: float, lr: float, batch_size: int) -> dict[str, Any]:
  """The rounds in dropnet_jax; returns times, the final params and mask."""
  from dropnet_jax.pruning import weight_criteria
  from dropnet_jax.config import TrainConfig
  from dropnet_jax.training.optim import OptimizerConfig
  from dropnet_jax.training.trainer import DeviceData, Trainer, steps_per_epoch
  from dropnet_jax.pruning.weight_masks import init_weight_mask

  config = TrainConfig(batch_size=batch_size, optim=OptimizerConfig(optimizer='sgd', lr=lr))
  trainer = Trainer(model, config, weight_masks=True,
                    steps_per_epoch=steps_per_epoch(len(dataset.train_labels), batch_size))
  data = DeviceData.from_dataset(dataset)
  params = theta0
  wmask = init_weight_mask(params)
  opt_state = trainer.tx.init(params)
  prune_fn = jax.jit(weight_criteria.global_l1, static_argnums=2)

  # Ahead-of-time compilation, timed on its own; the rounds then call the compiled programs.
  start = time.perf_counter()
  prune = prune_fn.lower(params, wmask, amount).compile()
  epoch = trainer.train_epoch.lower(params, opt_state, wmask, data.train_images, data.train_labels,
                                    keys[0][0]).compile()
  compile_seconds = time.perf_counter() - start

  times = []
  for round_keys in keys:
    start = time.perf_counter()
    t0 = time.perf_counter()
    wmask = jax.block_until_ready(prune(params, wmask))
    prune_seconds = time.perf_counter() - t0
    opt_state = trainer.tx.init(params)  # a fresh optimiser state per round, as every cycle of the driver
    for key in round_keys:
      params, opt_state, loss, _, _ = epoch(params, opt_state, wmask, data.train_images, data.train_labels, key)
    jax.block_until_ready(params)
    times.append({'round': time.perf_counter() - start, 'prune': prune_seconds, 'train_loss': float(loss)})
  accuracy = float(trainer.evaluate(params, wmask, data.test_images, data.test_labels).accuracy)
  return {'times': times, 'compile_seconds': compile_seconds, 'params': params, 'mask': wmask,
          'test_accuracy': accuracy}


# -- PyTorch --------------------------------------------------------------------------------------


def torch_rounds(model_name: str, widths, dataset, theta0, orders, *, amount: float, lr: float,
                 batch_size: int) -> dict[str, Any]:
  """The same rounds with torch.nn.utils.prune and an eager SGD loop."""
  import torch
  import torch.nn.functional as F
  from torch.nn.utils import prune

  from tests.torch_reference import models as torch_models
  from tests.torch_reference.weights import load_flax_params

  net = torch_models.create_model(model_name, widths, dataset.num_classes, dataset.image_shape)
  load_flax_params(net, jax.tree.map(np.asarray, theta0))
  masks = torch_models.full_masks(net)
  layers = [(m, 'weight') for m in [*net.convs, *net.dense]]
  images = torch.from_numpy(np.array(dataset.train_images))  # a writable copy
  labels = torch.from_numpy(np.asarray(dataset.train_labels, np.int64))

  times = []
  for round_orders in orders:
    start = time.perf_counter()
    t0 = time.perf_counter()
    # torch scores `module.weight`, which its forward pre-hook last recomputed before the final SGD step
    # (stale by one step); the current masked weights are passed instead, as JAX scores its current params.
    scores = {(m, name): (m.weight_orig * m.weight_mask).detach() if hasattr(m, 'weight_mask') else m.weight.detach()
              for m, name in layers}
    prune.global_unstructured(layers, pruning_method=prune.L1Unstructured, importance_scores=scores, amount=amount)
    prune_seconds = time.perf_counter() - t0
    opt = torch.optim.SGD(net.parameters(), lr=lr)  # after the prune: the parameters are now weight_orig
    net.train()
    for order in round_orders:
      for i in range(0, len(order), batch_size):
        idx = order[i:i + batch_size]
        logits, _ = net(images[idx], masks, with_stats=False)
        loss = F.cross_entropy(logits, labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    times.append({'round': time.perf_counter() - start, 'prune': prune_seconds, 'train_loss': loss.item()})
  net.eval()
  with torch.no_grad():
    test = torch.from_numpy(np.array(dataset.test_images))
    predictions = torch.cat([net(test[i:i + 1000], masks, with_stats=False)[0].argmax(1)
                             for i in range(0, len(test), 1000)])
  accuracy = float((predictions.numpy() == np.asarray(dataset.test_labels)).mean())
  kernels = {}
  for i, m in enumerate(net.convs):
    kernels[f'Conv_{i}'] = (m.weight_mask.permute(2, 3, 1, 0).numpy(), m.weight.detach().permute(2, 3, 1, 0).numpy())
  for i, m in enumerate(net.dense):
    kernels[f'Dense_{i}'] = (m.weight_mask.T.numpy(), m.weight.detach().T.numpy())
  return {'times': times, 'kernels': kernels, 'test_accuracy': accuracy, 'threads': torch.get_num_threads()}


# -- the comparison -------------------------------------------------------------------------------


def _summary(times: list[dict[str, float]]) -> dict[str, Any]:
  warm, timed = times[0], times[1:]
  rounds = [t['round'] for t in timed]
  return {'warmup_round_seconds': warm['round'], 'round_seconds': rounds,
          'median_round_seconds': float(np.median(rounds)),
          'median_prune_seconds': float(np.median([t['prune'] for t in timed])),
          'train_loss_per_round': [t['train_loss'] for t in times]}


def compare(model_name: str, widths, dataset, *, epochs: int, rounds: int, amount: float, lr: float,
            batch_size: int, seed: int, width_multiplier: float = 1.0) -> dict[str, Any]:
  from dropnet_jax.training.batches import shuffle_order
  from dropnet_jax.models import create_model, init_params

  model = create_model(model_name, widths, dataset.num_classes, width_multiplier)
  theta0 = init_params(model, jax.random.key(seed), dataset.image_shape)
  keys = epoch_keys(seed, rounds + 1, epochs)
  n = len(dataset.train_labels)
  orders = [[np.asarray(shuffle_order(k, n)).astype(np.int64) for k in ks] for ks in keys]

  j = jax_rounds(model, dataset, theta0, keys, amount=amount, lr=lr, batch_size=batch_size)
  t = torch_rounds(model_name, model.widths, dataset, theta0, orders, amount=amount, lr=lr, batch_size=batch_size)

  # Same work? The same weights pruned (up to ties and drift in the later rounds' magnitudes) and close weights.
  agree, total, kept, max_diff = 0, 0, 0, 0.0
  for layer, (t_mask, t_weight) in t['kernels'].items():
    j_mask = np.asarray(j['mask'][layer]['kernel'])
    j_weight = np.asarray(j['params'][layer]['kernel']) * j_mask
    agree += int(np.sum(j_mask == t_mask))
    total += j_mask.size
    kept += int(j_mask.sum())
    max_diff = max(max_diff, float(np.max(np.abs(j_weight - t_weight))))
  js, ts = _summary(j['times']), _summary(t['times'])
  return {
      'model': model_name, 'widths': list(model.widths), 'train_examples': n, 'batch_size': batch_size,
      'epochs_per_round': epochs, 'timed_rounds': rounds, 'amount': amount, 'lr': lr, 'seed': seed,
      'fraction_remaining': kept / total,
      'jax': {**js, 'compile_seconds': j['compile_seconds'], 'test_accuracy': j['test_accuracy'],
              'backend': jax.default_backend()},
      'torch': {**ts, 'test_accuracy': t['test_accuracy'], 'threads': t['threads']},
      'ratio_torch_over_jax': ts['median_round_seconds'] / js['median_round_seconds'],
      'mask_agreement': agree / total, 'max_abs_weight_difference': max_diff,
      'load_average': list(os.getloadavg()), 'cpu_count': os.cpu_count(),
  }


def main(argv):
  from dropnet_jax.runs.run_dir import RunDir  # here: --help does not need it
  del argv
  out = entry.FLAGS.out
  try:
    config = entry.config(CONFIG)
    if out.endswith('.json'):
      raise ValueError(f'--out={out}: --out is a run directory now (it gets bench.json and config.json); '
                       'give a directory')
    run_dir = RunDir(out, 'magnitude_bench', config)
    run_dir.check()
    entry.require_torch_twin('experiments.magnitude_bench')
    from dropnet_jax.input_pipeline import dataset_fingerprint, load_dataset
    from dropnet_jax.models import create_model
    create_model(config.model.name, config.model.widths, 10, config.model.width_multiplier)  # before the data
    dataset = load_dataset(config.data.dataset, config.data.data_dir, split_seed=config.data.split_seed)
    run_dir.data_fingerprint = dataset_fingerprint(dataset)
    run_dir.check()
  except ValueError as e:  # includes input_pipeline.DataError
    entry.fail(e)
  import torch
  if config.torch_threads:
    torch.set_num_threads(config.torch_threads)
  with run_dir.open(resume_hint='bench.json was not written; rerun the command to time again'):
    result = compare(config.model.name, config.model.widths, dataset, epochs=config.epochs, rounds=config.rounds,
                     amount=config.amount, lr=config.lr, batch_size=config.batch_size, seed=config.seed,
                     width_multiplier=config.model.width_multiplier)
    path = run_dir.write_text('bench.json', json.dumps(result, indent=2))
  j, t = result['jax'], result['torch']
  print(f'{result["model"]} {result["widths"]}: {config.epochs} epoch(s) of {result["train_examples"]} examples '
        f'per round, prune {config.amount:g} of the remaining by global |w|; {config.rounds} timed rounds after a '
        'warm-up')
  print(f'  JAX    round {j["median_round_seconds"]:.3f}s (median; prune {j["median_prune_seconds"] * 1e3:.1f} ms), '
        f'warm-up round {j["warmup_round_seconds"]:.2f}s, compile {j["compile_seconds"]:.2f}s, '
        f'test acc {j["test_accuracy"]:.4f}')
  print(f'  torch  round {t["median_round_seconds"]:.3f}s (median; prune {t["median_prune_seconds"] * 1e3:.1f} ms), '
        f'warm-up round {t["warmup_round_seconds"]:.2f}s, {t["threads"]} threads, test acc {t["test_accuracy"]:.4f}')
  print(f'  ratio torch / JAX per round: {result["ratio_torch_over_jax"]:.2f}; weights remaining '
        f'{result["fraction_remaining"]:.3f}; masks agree on {result["mask_agreement"]:.4%} of weights; '
        f'max |w_jax - w_torch| {result["max_abs_weight_difference"]:.2e}; load average {result["load_average"]}')
  print(f'wrote {path}')


if __name__ == '__main__':
  entry.run(main)
