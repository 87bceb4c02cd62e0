"""Unstructured weight pruning run by the one loop: one-shot, iterative fine-tuning, lottery tickets.

Every method is `driver.Driver` with weight masks (`weight_masks`, a 0/1
array per prunable kernel) and a registered weight criterion (`criteria`:
global_l1, layer_l1, global_random, layer_random; amounts are fractions of
the *remaining* weights, as in `torch.nn.utils.prune`). Cycle 0 is the dense
network trained from θ0 (shared by every trial of a seed, as in DropNet).
With a loaded network (`start_theta`, `--init_from`; `runs.init_from`) cycle 0 is that
network evaluated as given instead (0 epochs), the magnitude report's "load the
pretrained ckpt.pth", and every method proceeds from it.
A trial is (seed, method, target sparsity s); what a cycle starts from and
how long it trains is the method:

  oneshot         prune the trained dense network to s at once, then fine-tune
                  from its trained weights for `finetune_epochs`;
  iterative       prune q of the remaining weights, fine-tune `round_epochs` from
                  the current weights, repeat until s (the last round lands on s
                  exactly), then train `final_epochs` more;
  lottery         Algorithm 1 at weight granularity (Frankle & Carbin): train
                  from θ0, prune q of the remaining, rewind the survivors to θ0,
                  repeat; one trial runs to the largest target and every target
                  is hit exactly on the way;
  lottery_reinit  the lottery ticket's masks, cycle by cycle, each trained from
                  a fresh random initialisation instead of θ0 (the control of
                  Frankle & Carbin): it follows its lottery sibling, so it must
                  train in the same group (the entry point batches all trials).

Every cycle uses early stopping on the validation loss within its epoch
limit and keeps the best-validation-loss params (as the DropNet cycles do).
Records carry the fraction of prunable weights remaining, the sparsity of
the prunable weights and of all params, per-layer sparsity and a mask
fingerprint (masks themselves never go into JSON).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import numpy as np

from dropnet_jax import theta as theta_lib
from dropnet_jax.pruning import criteria
from dropnet_jax.config import TrainConfig
from dropnet_jax.loop.dropnet import SeedKeys, random_init_key
from dropnet_jax.loop.driver import Driver, Outcome, RunIO, Trial, log_info
from dropnet_jax.models.layers import full_masks, zero_sums
from dropnet_jax.models import init_params
from dropnet_jax.pruning.weight_masks import init_weight_mask, mask_fingerprint, sparsity_report
from dropnet_jax.settings import setting

METHODS = ('oneshot', 'iterative', 'lottery', 'lottery_reinit')
_EPS = 1e-9


@dataclasses.dataclass(frozen=True)
class MagnitudeConfig:
  """Weight magnitude pruning's settings: which methods, criterion and target sparsities, and how
  long each method trains."""
  methods: tuple[str, ...] = setting(('oneshot', 'iterative', 'lottery', 'lottery_reinit'),
                                     'Methods: oneshot, iterative (fine-tuning rounds), lottery (θ0 rewind), '
                                     'lottery_reinit (its control).', flag='methods')
  criterion: str = setting('global_l1', 'Which weights go: smallest |w| over all layers (torch global_unstructured '
                           'L1) or per layer, or random.', flag='criterion',
                           choices=('global_l1', 'layer_l1', 'global_random', 'layer_random'))
  sparsities: tuple[float, ...] = setting((0.5, 0.75, 0.9), 'Target sparsities of the prunable weights.',
                                          flag='sparsities')
  prune_fraction: float = setting(0.2, 'lottery: fraction q of the remaining weights pruned per round.',
                                  flag='prune_fraction')
  iterative_fraction: float = setting(0.11, "iterative: fraction of the remaining weights pruned per round (the "
                                      "source report's 11 %).", flag='iterative_fraction')
  finetune_epochs: int = setting(20, 'oneshot: epochs of fine-tuning after the prune.', flag='finetune_epochs')
  round_epochs: int = setting(5, 'iterative: epochs of fine-tuning per round.', flag='round_epochs')
  final_epochs: int = setting(100, 'iterative: epochs of training once the target is reached.', flag='final_epochs')
  biases: bool = setting(False, 'Biases are prunable too (default: Dense and Conv kernels only).',
                         flag='prune_biases')
  output_layer: bool = setting(True, 'The output layer\'s kernel is prunable.')
  train: TrainConfig = TrainConfig()

  def validate(self) -> None:
    if not self.methods or any(m not in METHODS for m in self.methods):
      raise ValueError(f'methods must be some of {METHODS}, got {self.methods}')
    if 'lottery_reinit' in self.methods and 'lottery' not in self.methods:
      raise ValueError('methods: lottery_reinit follows the lottery ticket\'s masks; add lottery')
    criteria.get(self.criterion, 'weight')
    if not self.sparsities or any(not (0 < s < 1) for s in self.sparsities):
      raise ValueError(f'sparsities must be in (0, 1), got {self.sparsities}')
    if len(set(self.sparsities)) != len(self.sparsities):
      raise ValueError(f'sparsities: duplicates in {self.sparsities} (each target is one trial)')
    if len(set(self.methods)) != len(self.methods):
      raise ValueError(f'methods: duplicates in {self.methods}')
    for name in ('prune_fraction', 'iterative_fraction'):
      if not 0 < getattr(self, name) < 1:
        raise ValueError(f'{name} must be in (0, 1), got {getattr(self, name)}')
    for name in ('finetune_epochs', 'round_epochs', 'final_epochs'):
      if getattr(self, name) < 1:
        raise ValueError(f'{name} must be a positive integer, got {getattr(self, name)}')
    self.train.validate()


@dataclasses.dataclass(kw_only=True)
class MagnitudeTrial(Trial):
  """A trial of one method and target sparsity. The loop and the checkpoints name a trial by its
  `metric`, a label of the two ('oneshot s=0.9', kept as the records' `metric`); the method reads
  these typed fields (the records' `method` and `target_sparsity`) instead of parsing the label."""
  method: str  # one of METHODS
  target: float  # the target sparsity (the lottery trials': the largest of the config's)
  recorded_mask: Any = None  # the weight mask of the newest record (`advance` moves `mask` on to the next cycle's)


def trial_label(method: str, target: float | None) -> str:
  """The records' `metric`: 'oneshot s=0.9'; the lottery trials run to the largest target: 'lottery'."""
  return method if method in ('lottery', 'lottery_reinit') else f'{method} s={target:g}'


def make_trials(config: MagnitudeConfig, seeds: Sequence[int], full_mask) -> list[MagnitudeTrial]:
  """Per seed: the lottery trial before its reinit sibling, then one trial per (method, target)."""
  trials = []
  for seed in seeds:
    for method in config.methods:
      if method in ('lottery', 'lottery_reinit'):
        trials.append(MagnitudeTrial(seed, trial_label(method, None), full_mask, method=method,
                                     target=max(config.sparsities)))
      else:
        trials += [MagnitudeTrial(seed, trial_label(method, s), full_mask, method=method, target=s)
                   for s in sorted(config.sparsities)]
  return trials


class MagnitudeMethod:
  """The weight-pruning methods' side of the loop (`driver.Method`)."""
  score_from, score_params = 'data', 'best'

  def __init__(self, model, image_shape: Sequence[int], data, config: MagnitudeConfig, trials: list[MagnitudeTrial],
               log: Callable[[str], None] = log_info, start_theta: Any = None):
    self.model, self.image_shape, self.config, self.log = model, tuple(image_shape), config, log
    self.start_theta = start_theta  # a loaded dense network (runs.init_from), or None: trained from θ0
    self.trials = trials
    theta = self.theta0(0)
    self._params_template = theta_lib.params(theta)
    self._full = init_weight_mask(self._params_template, biases=config.biases, output_layer=config.output_layer)
    self.criterion = criteria.get(config.criterion, 'weight')
    self.context = criteria.Context(model.apply, data.train_images, data.train_labels)

  def theta0(self, seed: int):
    return init_params(self.model, SeedKeys.for_seed(seed).init, self.image_shape)

  def full_mask(self):
    return self._full

  def dense_start(self, seed: int) -> tuple[Any, int | None]:
    """The dense cycle: the loaded network evaluated as given (0 epochs), else trained from θ0."""
    del seed
    return (None, None) if self.start_theta is None else (self.start_theta, 0)

  def recorded_weight_mask(self, trial: MagnitudeTrial):
    """The weight mask the trial's newest record was trained under (saved with its θ)."""
    return trial.recorded_mask

  def sums_template(self):
    return zero_sums(full_masks(self.model))

  def shuffle_key(self, seed: int, cycle: int) -> jax.Array:
    return SeedKeys.for_seed(seed).shuffle_key(cycle)

  def mask_fields(self, wmask) -> dict[str, Any]:
    report = sparsity_report(self._params_template, wmask)
    return {'fraction_remaining': report['prunable_kept'] / report['prunable_params'],
            'sparsity': report['prunable_sparsity'], 'global_sparsity': report['global_sparsity'],
            'params': report['total_kept'],
            'layer_sparsity': {name: v['sparsity'] for name, v in report['layers'].items()},
            'mask_fingerprint': mask_fingerprint(wmask)}

  # -- the cycle ------------------------------------------------------------------------------

  def _amount_to(self, remaining: float, q: float, targets: Sequence[float]) -> float:
    """q of the remaining weights, or less so as to land exactly on the next target sparsity."""
    upcoming = [t for t in sorted(targets) if t > 1 - remaining + _EPS]
    next_fraction = 1 - upcoming[0]
    return min(q, 1 - next_fraction / remaining)

  def _prune(self, trial: MagnitudeTrial, theta, amount: float):
    key = jax.random.fold_in(SeedKeys.for_seed(trial.seed).mask_key(trial.metric, trial.cycle), 0)
    inputs = criteria.PruneInputs(theta, None, trial.mask, key, amount)
    return self.criterion(inputs, self.context)

  def advance(self, trial: MagnitudeTrial, outcome: Outcome, dense: Outcome) -> None:
    method, target = trial.method, trial.target
    previous = trial.records[-1] if trial.records else None
    phase = 'dense' if previous is None else previous['next']
    record = {'seed': trial.seed, 'metric': trial.metric, 'cycle': trial.cycle, 'method': method,
              'target_sparsity': target, 'phase': phase, **outcome.fields}
    trial.recorded_mask = trial.mask
    remaining = record['fraction_remaining']
    reached = record['sparsity'] >= target - 1e-6
    stop, next_phase, new_mask, theta, epochs = None, None, trial.mask, None, None
    if record['diverged']:
      stop = 'diverged'
    elif method == 'oneshot':
      if trial.cycle == 0:
        new_mask, theta, epochs, next_phase = self._prune(trial, outcome.best_theta, target), outcome.best_theta, \
            self.config.finetune_epochs, 'finetune'
      else:
        stop = 'target'
    elif method == 'iterative':
      if not reached:
        amount = self._amount_to(remaining, self.config.iterative_fraction, [target])
        new_mask = self._prune(trial, outcome.best_theta, amount)
        # Within one weight of the target the rounded count is 0: as close as the weights allow, so the
        # final training starts (else the same round would repeat forever).
        reached = mask_fingerprint(new_mask) == mask_fingerprint(trial.mask)
      if not reached:
        theta, epochs, next_phase = outcome.best_theta, self.config.round_epochs, 'round'
      elif phase != 'final':
        theta, epochs, next_phase = outcome.best_theta, self.config.final_epochs, 'final'
      else:
        stop = 'target'
    elif method == 'lottery':
      if not reached:
        amount = self._amount_to(remaining, self.config.prune_fraction, self.config.sparsities)
        new_mask, next_phase = self._prune(trial, outcome.best_theta, amount), 'rewind'
        reached = mask_fingerprint(new_mask) == mask_fingerprint(trial.mask)  # within one weight: see iterative
      if reached:
        stop, new_mask, next_phase = 'target', trial.mask, None
    else:  # lottery_reinit: the sibling lottery trial (same seed) advanced just before this one
      sibling = next(t for t in self.trials if t.seed == trial.seed and t.method == 'lottery')
      if sibling.stopped and sibling.records[-1]['cycle'] <= trial.cycle:
        stop = 'target'
      else:
        new_mask, next_phase = sibling.mask, 'reinit'
        theta = init_params(self.model, random_init_key(trial.seed, trial.cycle + 1), self.image_shape)
    record['next'] = next_phase
    record['stop_reason'] = stop
    trial.records.append(record)
    self.log(f'seed {trial.seed} {trial.metric:>16} cycle {trial.cycle:2d} weights {remaining:.3f} '
             f'test_acc {record["test_accuracy"]:.4f} epoch {record["early_stop_epoch"]} ({record["seconds"]:.1f}s)'
             + (f' stop: {stop}' if stop else ''))
    if stop:
      trial.stopped = True
    else:
      trial.mask, trial.theta, trial.epochs, trial.cycle = new_mask, theta, epochs, trial.cycle + 1


# -- reports ------------------------------------------------------------------------------------


def at_targets(records: Sequence[dict[str, Any]], targets: Sequence[float]) -> list[dict[str, Any]]:
  """Per (seed, method, target) the record that reports it: the final record of a per-target trial,
  or the lottery trials' record closest to that sparsity (the rounds land on it exactly, but the round
  before can be within rounding too); `drop` = dense test accuracy - its."""
  dense = {r['seed']: r['test_accuracy'] for r in records if r['cycle'] == 0}
  best: dict[tuple, tuple[float, dict[str, Any]]] = {}
  for r in records:
    if r['cycle'] == 0:
      continue
    for target in targets:
      distance = abs(r['sparsity'] - target)
      per_target = r['method'] in ('oneshot', 'iterative') and r['stop_reason'] == 'target'
      lottery = r['method'] in ('lottery', 'lottery_reinit')
      if distance < 1e-3 and (per_target or lottery):
        key = (r['seed'], r.get('metric', r['method']), target)
        if key not in best or distance < best[key][0]:
          best[key] = (distance, r)
  return [{'seed': r['seed'], 'method': r['method'], 'target': target, 'test_accuracy': r['test_accuracy'],
           'drop': dense[r['seed']] - r['test_accuracy']} for (_, _, target), (_, r) in best.items()]


def sparsity_table(records: Sequence[dict[str, Any]], targets: Sequence[float], methods: Sequence[str]) -> str:
  """The source report's table: method x target sparsity -> test-accuracy drop against the dense
  network, in points (mean ± sample std over seeds; n/a for one seed)."""
  rows = at_targets(records, targets)
  head = '| method | ' + ' | '.join(f'{t:.0%} sparsity' for t in targets) + ' |'
  lines = [head, '|' + ' --- |' * (len(targets) + 1)]
  for method in methods:
    cells = []
    for t in targets:
      drops = [100 * r['drop'] for r in rows if r['method'] == method and r['target'] == t]
      if not drops:
        cells.append('-')
      elif len(drops) == 1:  # no spread from one seed: say so rather than print ± 0.00
        cells.append(f'{drops[0]:.2f} ± n/a (n=1)')
      else:
        cells.append(f'{np.mean(drops):.2f} ± {np.std(drops, ddof=1):.2f} (n={len(drops)})')
    lines.append(f'| {method} | ' + ' | '.join(cells) + ' |')
  dense = sorted({(r['seed'], r['test_accuracy']) for r in records if r['cycle'] == 0})
  lines.append(f'\ndense test accuracy: {np.mean([a for _, a in dense]):.4f} over {len(dense)} seed(s); '
               'a drop is dense minus pruned, in points (negative: better than dense)')
  return '\n'.join(lines)


def figure_records(records: Sequence[dict[str, Any]], dropnet_records: Sequence[dict[str, Any]] = (),
                   dropnet_metrics: Sequence[str] = ('min', 'min_layer')) -> list[dict[str, Any]]:
  """Records for one figure of test accuracy vs fraction of weights remaining: a line per method
  (per-target trials contribute their final record), and DropNet node pruning placed by the weights
  of its compact network (`params` / the dense network's)."""
  out, dense_seen = [], set()
  for r in records:
    if r['cycle'] == 0:  # the dense network starts every method's line, once per seed
      if (r['seed'], r['method']) not in dense_seen:
        dense_seen.add((r['seed'], r['method']))
        out.append({**r, 'metric': r['method']})
      continue
    if r['method'] in ('oneshot', 'iterative') and r['stop_reason'] != 'target':
      continue  # intermediate rounds
    lottery = r['method'] in ('lottery', 'lottery_reinit')
    out.append({**r, 'metric': r['method'], 'cycle': r['cycle'] if lottery else 1 + round(1000 * r['sparsity'])})
  dense_params = {r['seed']: r['params'] for r in dropnet_records if r['cycle'] == 0}
  for r in dropnet_records:
    if r['metric'] in dropnet_metrics:
      out.append({**r, 'metric': f'DropNet {r["metric"]}', 'fraction_remaining': r['params'] / dense_params[r['seed']]})
  return out


def run(model, image_shape, data, seeds: Sequence[int], config: MagnitudeConfig, trainer=None,
        io: RunIO | None = None, lanes_per_chunk: int | None = None, start_theta: Any = None) -> list[dict[str, Any]]:
  """Every method x target x seed as lanes of one group (the lottery_reinit trials follow their
  lottery siblings cycle by cycle); resumable like DropNet, with what the run writes and reports
  in `io` (`driver.RunIO`; None: in memory, lines to logging at INFO). Returns the records.
  `start_theta`: a loaded dense network (`runs.init_from`): cycle 0 evaluates it instead of training
  from θ0, and one-shot and iterative pruning prune and fine-tune it (the lottery methods still rewind
  to the seed's θ0)."""
  from dropnet_jax.training.lanes import Lanes
  from dropnet_jax.training.trainer import Trainer, steps_per_epoch
  config.validate()
  io = io or RunIO()
  trainer = trainer or Trainer(model, config.train, weight_masks=True,
                               steps_per_epoch=steps_per_epoch(data.train_labels.shape[0], config.train.batch_size))
  if not trainer.weight_masks:
    raise ValueError('magnitude pruning needs a Trainer(..., weight_masks=True)')
  trials: list[MagnitudeTrial] = []
  method = MagnitudeMethod(model, image_shape, data, config, trials, io.log, start_theta)
  trials += make_trials(config, seeds, method.full_mask())
  return Driver(method, trials, Lanes(trainer, lanes_per_chunk), data, io=io).run()
