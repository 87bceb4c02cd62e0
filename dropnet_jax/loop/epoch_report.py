"""What the driver reports after every trained epoch: one host read of the lanes' small scalars.

Both schedules of `driver.Driver` (the barrier and `continuous`) train lanes an
epoch at a time; after each epoch the lanes being trained go to the run's
monitor, log (`RunIO.log_epochs`) and learning curves (`RunIO.curves`) from one
transfer of the per-lane scalars, never per step. A lane is named by its index
in the training state, so the barrier's "lanes 0..n-1 of one cycle" and the
continuous schedule's "these lanes, each at its own cycle" are reported alike.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np

from dropnet_jax.training.trainer import FitState


def report_epoch(io, runner, state: FitState, lanes: Sequence[int], labels: Sequence[str], cycles: Sequence[int],
                 owners: Sequence[Sequence[tuple[int, str]]], reported: list[int]) -> None:
  """The epoch of `lanes` (lane indices into `state`; per lane its `labels`, `cycles` and the
  (seed, metric) of the trials whose cycle it is, `owners`) to `io`'s monitor, log and curves.
  `reported[lane]`: the last epoch whose curve rows were given (updated here; a finished lane trained
  nothing, so it gives no rows)."""
  curves = io.curves
  hyper = getattr(state.opt_state, 'hyperparams', None) if curves is not None else None
  s, hyper = jax.device_get((state._replace(params=None, opt_state=None, best_params=None, best_sums=None,
                                            key=None, masks=None), hyper))
  if not runner.batched:
    s, hyper = jax.tree.map(lambda x: np.asarray(x)[None], (s, hyper))
  lanes = list(lanes)
  if curves is not None:
    rows = []
    for lane, cycle, trials in zip(lanes, cycles, owners):
      epoch = int(s.epoch[lane])
      if epoch <= reported[lane]:
        continue  # a finished lane: nothing trained
      reported[lane] = epoch
      values = {'train_loss': short(s.train_loss[lane]), 'train_accuracy': short(s.train_accuracy[lane]),
                'val_loss': short(s.val_loss[lane]), 'val_accuracy': short(s.val_accuracy[lane]),
                'lr': lr_in_force(hyper, lane)}
      rows += [{'seed': seed, 'metric': metric, 'cycle': cycle, 'epoch': epoch, **values} for seed, metric in trials]
    if rows:
      curves.add(rows)
  if io.monitor:
    shown = sorted(set(cycles))
    io.monitor({'event': 'epoch', 'cycle': shown[0] if len(shown) == 1 else f'{shown[0]}-{shown[-1]}',
                'labels': list(labels), 'epochs': s.epoch[lanes].tolist(),
                'val_accuracy': s.val_accuracy[lanes].tolist(), 'done': s.done[lanes].tolist()})
  if not io.log_epochs:
    return
  top = np.max(s.epoch[lanes]) if lanes else 0
  for lane, label, cycle in zip(lanes, labels, cycles):
    if s.epoch[lane] > 0 and (not s.done[lane] or s.epoch[lane] == top):
      io.log(f'{label} cycle {cycle:2d} epoch {int(s.epoch[lane]):3d} train_loss {float(s.train_loss[lane]):.4f} '
             f'val_loss {float(s.val_loss[lane]):.4f} val_acc {float(s.val_accuracy[lane]):.4f}'
             + (' (stop)' if s.done[lane] else ''))


def lr_in_force(hyper: dict[str, Any] | None, lane: int) -> float | None:
  """Lane `lane`'s learning rate at its last step: `optim.make_optimizer`'s injected learning_rate
  times the schedule's lr_factor, both as that step used them (float32, as in the update)."""
  if not hyper or 'learning_rate' not in hyper:
    return None
  lr = np.float32(hyper['learning_rate'][lane])
  if 'lr_factor' in hyper:
    lr = lr * np.float32(hyper['lr_factor'][lane])
  return short(lr)


def short(x) -> float:
  """A float32 as the shortest float that reads back to it (lr 0.1, not 0.10000000149011612)."""
  return float(str(np.float32(x)))
