"""A run's state as `driver.Driver` advances it, and its checkpoint format.

`Trial` is one run of a method as it advances, `Outcome` one trained and
measured cycle of a lane, `Position` everything else a rerun needs (the current
group, θ0 of its seeds, the shared dense outcomes, a mid-cycle training state).
`save` writes all of it as one checkpoint (arrays plus a JSON meta); `restore`
reads the newest readable one back into the trials, after checking that it is
of the same experiment (seeds, metrics, format) made with the same settings and
data (the `stamp`), so a checkpoint is never continued under other settings.
`curve_rows_kept` says which learning-curve rows of earlier invocations a
restored position accounts for (the rest are trained again).

The continuous schedule (`continuous`) saves the same position; its lanes'
jobs (which trial's cycle, or which seed's dense cycle, each lane trains) go
in the meta (`Position.fit_meta['lanes']`), so a restored run continues every
lane at its own cycle and epoch.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dropnet_jax import settings
from dropnet_jax.models.layers import StatSums
from dropnet_jax.runs.checkpoint import CheckpointError
from dropnet_jax.training.trainer import FitState

CHECKPOINT_VERSION = 2


@dataclasses.dataclass
class Trial:
  """One run of the method as it advances: `mask` and `cycle` are those of its next cycle."""
  seed: int
  metric: str
  mask: Any
  cycle: int = 0
  stopped: bool = False
  records: list[dict[str, Any]] = dataclasses.field(default_factory=list)
  theta: Any = None  # θ the next cycle starts from, for methods that continue training (None: θ0)
  epochs: int | None = None  # the next cycle's epoch limit, for methods that set one (None: the config's)


class Outcome(NamedTuple):
  """A trained cycle of one lane, measured: record fields, scoring sums and the trained θ."""
  fields: dict[str, Any]
  sums: StatSums
  best_theta: Any  # θ at the best-validation-loss epoch (what the record's accuracies are of)
  score_theta: Any  # θ the criteria score (best or last, per the method's config)


@dataclasses.dataclass
class Position:
  """Everything besides the trials that a rerun needs to continue exactly."""
  group: int = 0
  theta0: dict[int, Any] = dataclasses.field(default_factory=dict)  # seed -> θ0, while a trial needs it
  dense: dict[int, Outcome] = dataclasses.field(default_factory=dict)  # seed -> shared cycle 0
  fit: FitState | None = None  # a partly trained group (mid-cycle checkpoint)
  # {'phase', 'cycle', 'seconds'} of `fit`; the continuous schedule's: {'schedule', 'lanes', 'steps'}
  fit_meta: dict[str, Any] | None = None


stack = lambda trees: jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def save(checkpointer, trials: list[Trial], pos: Position, stamp: dict[str, Any] | None, *, force: bool = False,
         cycle_end: bool = False) -> bool:
  """Offers the whole position as one checkpoint (the arrays of unfinished trials only) to `checkpointer`, which
  saves it now or keeps it (`runs.checkpoint.Checkpointer.offer`: `force`, `cycle_end`); True when saved. Record
  lists are copied (the loop appends to them); arrays are immutable jax arrays, kept by reference."""
  leaves = jax.tree.leaves
  arrays: dict[str, Any] = {
      'cycles': np.asarray([t.cycle for t in trials], np.int32),  # never empty (orbax refuses that)
      'masks': {f't{i}': leaves(t.mask) for i, t in enumerate(trials) if not t.stopped},
      'thetas': {f't{i}': leaves(t.theta) for i, t in enumerate(trials) if not t.stopped and t.theta is not None},
      'theta0': {f's{s}': leaves(th) for s, th in pos.theta0.items()},
      'dense': {f's{s}': {'sums': leaves(o.sums), 'best': leaves(o.best_theta), 'score': leaves(o.score_theta)}
                for s, o in pos.dense.items()},
  }
  if pos.fit is not None:
    arrays['fit'] = leaves(_key_data(pos.fit))
  arrays = {k: v for k, v in arrays.items() if not isinstance(v, dict) or v}  # orbax stores no empty dicts
  meta = {'version': CHECKPOINT_VERSION, 'group': pos.group,
          'trials': [{'seed': t.seed, 'metric': t.metric, 'stopped': t.stopped, 'epochs': t.epochs,
                      'has_theta': t.theta is not None, 'records': list(t.records)} for t in trials],
          'stamp': stamp, 'theta0_seeds': sorted(pos.theta0),
          'dense': {str(s): dict(o.fields) for s, o in pos.dense.items()}, 'fit': pos.fit_meta}
  return checkpointer.offer(arrays, meta, force=force, cycle_end=cycle_end)


def restore(checkpointer, method, runner, lane_count: int, trials: list[Trial],
            stamp: dict[str, Any] | None) -> Position | None:
  """Loads the newest readable checkpoint (an unreadable newer one is skipped with a warning) into
  `trials`; the position to continue from, or None when there is no checkpoint. `method`, `runner`
  and `lane_count` give the shapes of the arrays to read (`driver.Method`, `lanes.Lanes`/`OneLane`)."""

  def templates(meta: dict[str, Any]) -> dict[str, Any]:
    if meta.get('version') != CHECKPOINT_VERSION or [(t['seed'], t['metric']) for t in meta['trials']] != [
        (t.seed, t.metric) for t in trials]:
      raise CheckpointError(f'{checkpointer.directory} holds a checkpoint of another experiment '
                            '(other seeds, metrics or format); use another output directory')
    differences = settings.differences(meta.get('stamp'), stamp)
    if differences:
      raise CheckpointError(f'{checkpointer.directory} holds a checkpoint made with other settings or data '
                            f'({"; ".join(differences)}); use another output directory or the same settings')
    return _templates(method, runner, lane_count, meta)

  found = checkpointer.restore_latest(templates)
  if found is None:
    return None
  _, meta, arrays = found
  unflatten = lambda like, xs: jax.tree.unflatten(jax.tree.structure(like), [jnp.asarray(x) for x in xs])
  theta, mask, sums = method.theta0(0), method.full_mask(), method.sums_template()
  for i, (trial, saved) in enumerate(zip(trials, meta['trials'])):
    trial.cycle, trial.stopped, trial.records = int(arrays['cycles'][i]), saved['stopped'], saved['records']
    trial.epochs = saved['epochs']
    if not trial.stopped:
      trial.mask = unflatten(mask, arrays['masks'][f't{i}'])
      if saved['has_theta']:
        trial.theta = unflatten(theta, arrays['thetas'][f't{i}'])
  pos = Position(group=meta['group'])
  for s in meta['theta0_seeds']:
    pos.theta0[s] = unflatten(theta, arrays['theta0'][f's{s}'])
  for s, fields in meta['dense'].items():
    a = arrays['dense'][f's{s}']
    pos.dense[int(s)] = Outcome(fields, unflatten(sums, a['sums']), unflatten(theta, a['best']),
                                unflatten(theta, a['score']))
  if meta['fit'] is not None:
    pos.fit = _wrap_key(unflatten(_key_data(_fit_template(method, runner, lane_count)), arrays['fit']))
    pos.fit_meta = meta['fit']
  return pos


def curve_rows_kept(trials: list[Trial], pos: Position, active: list[Trial],
                    in_flight: dict[tuple[int, str, int], int] | None = None) -> Callable[[dict[str, Any]], bool]:
  """Which learning-curve rows (`driver.CurveSink`) of earlier invocations the position `pos` accounts
  for: those of recorded cycles, of the shared dense cycles it holds, and of the epochs its mid-cycle
  state has trained (`active`: the current group's unstopped trials, whose cycle, or whose seeds'
  dense cycle, it is; a lane that stopped earlier wrote no rows past its stop). Rows of epochs trained
  after the checkpoint are trained again, so they are dropped and written anew; a fresh position
  keeps none. The continuous schedule's lanes are each at their own cycle and epoch: it gives them as
  `in_flight`, (seed, metric, cycle) -> the last epoch trained, instead of `active`."""
  recorded = {(t.seed, t.metric, r['cycle']) for t in trials for r in t.records}
  dense = set(pos.dense)
  partial: set[tuple[int, str, int]] = set()
  last_epoch = 0
  if pos.fit is not None and in_flight is None:  # the lanes the driver trains next, as it derives them
    if pos.fit_meta['phase'] == 'dense':  # cycle 0 of every trial of the seeds being trained
      seeds = {t.seed for t in active if t.seed not in dense}
      partial = {(t.seed, t.metric, 0) for t in trials if t.seed in seeds}
    else:
      partial = {(t.seed, t.metric, pos.fit_meta['cycle']) for t in active}
    last_epoch = int(np.max(np.asarray(pos.fit.epoch)))
  epochs = dict(in_flight) if in_flight is not None else {key: last_epoch for key in partial}

  def keep(row: dict[str, Any]) -> bool:
    key = (row['seed'], row['metric'], row['cycle'])
    return (key in recorded or (row['cycle'] == 0 and row['seed'] in dense)
            or (key in epochs and row['epoch'] <= epochs[key]))
  return keep


def _templates(method, runner, lane_count: int, meta: dict[str, Any]) -> dict[str, Any]:
  """Abstract arrays (shapes and dtypes) of a checkpoint described by `meta`."""
  theta = jax.eval_shape(lambda: method.theta0(0))
  mask = jax.eval_shape(method.full_mask)
  sums = jax.eval_shape(lambda: method.sums_template())
  leaves = jax.tree.leaves
  out: dict[str, Any] = {
      'cycles': jax.ShapeDtypeStruct((len(meta['trials']),), np.int32),
      'masks': {f't{i}': leaves(mask) for i, t in enumerate(meta['trials']) if not t['stopped']},
      'thetas': {f't{i}': leaves(theta) for i, t in enumerate(meta['trials'])
                 if not t['stopped'] and t['has_theta']},
      'theta0': {f's{s}': leaves(theta) for s in meta['theta0_seeds']},
      'dense': {f's{s}': {'sums': leaves(sums), 'best': leaves(theta), 'score': leaves(theta)}
                for s in meta['dense']},
  }
  if meta['fit'] is not None:
    out['fit'] = leaves(jax.eval_shape(lambda: _key_data(_fit_template(method, runner, lane_count))))
  return {k: v for k, v in out.items() if not isinstance(v, dict) or v}


def _fit_template(method, runner, lane_count: int) -> FitState:
  """A FitState of the group's structure (one trial's, or `lane_count` lanes'), to read a saved one into."""
  theta, mask = method.theta0(0), method.full_mask()
  key = method.shuffle_key(0, 0)
  if not runner.batched:
    return runner.trainer.init_fit(theta, mask, key)
  n = lane_count
  return jax.vmap(runner.trainer.init_fit)(stack([theta] * n), stack([mask] * n), jnp.stack([key] * n))


def _key_data(state: FitState) -> FitState:
  """PRNG keys are stored as their raw key data (a typed key array is not a storable array)."""
  return state._replace(key=jax.random.key_data(state.key))


def _wrap_key(state: FitState) -> FitState:
  return state._replace(key=jax.random.wrap_key_data(state.key))
