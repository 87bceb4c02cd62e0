"""Many trials of one `Trainer` as lanes of one compiled program.

Every `FitState` leaf carries a leading lane (trial) axis; the data are
shared. `Lanes.epoch_step` advances all lanes by one epoch with the one-trial
`Trainer._epoch_step`, so each lane early-stops on its own: a done lane passes
through unchanged and is not recomputed. How the lanes are processed
(`lanes_per_chunk`): chunks of that many lanes, each chunk vmapped, one chunk
after another (a chunk whose lanes are all done is skipped). Default: 1 on
CPU (one trial at a time in a loop: XLA:CPU runs one trial's small matmuls at
least as fast as batched ones, and finished trials then cost nothing), all
lanes at once (plain vmap) on accelerators. With several devices and a lane
count that is a multiple of theirs, the lanes are split over the devices
(each device runs its own trials: no per-step communication).

`OneLane` offers the same interface over the one-trial programs (no lane
axis), so the driver treats a group of one trial and a batch of many alike.

The continuous schedule (`loop.continuous`) restarts single lanes while the
others train on: `init_one` builds one lane's fresh state, `put_lane` writes
it into lane i and `take_lanes` gathers some lanes to measure them; the lane
index and the gathered indices are traced arguments, so no lane change
recompiles anything.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from dropnet_jax.models.layers import Masks
from dropnet_jax.training.trainer import DATA_AXIS, DeviceData, EvalResult, FitState, Trainer


class OneLane:
  """A single trial with the one-trial programs (the state has no lane axis)."""
  batched = False

  def __init__(self, trainer: Trainer):
    self.trainer = trainer
    self.init_fit = trainer.init_fit
    self.epoch_step = trainer.epoch_step

  def evaluate(self, params, masks: Masks, images: jax.Array, labels: jax.Array, active=None) -> EvalResult:
    del active
    return self.trainer.evaluate(params, masks, images, labels)

  @staticmethod
  def lane(tree, index: int):
    del index
    return tree


class Lanes:
  """Batched trials: `init_fit`, `epoch_step` and `evaluate` over a leading lane axis."""
  batched = True

  def __init__(self, trainer: Trainer, lanes_per_chunk: int | None = None):
    self.trainer = trainer
    if lanes_per_chunk is None:
      lanes_per_chunk = 1 if trainer.mesh.devices.flat[0].platform == 'cpu' else 1 << 30
    if lanes_per_chunk < 1:
      raise ValueError(f'lanes_per_chunk must be positive, got {lanes_per_chunk}')
    self.lanes_per_chunk = lanes_per_chunk
    self.init_fit = jax.jit(jax.vmap(trainer.init_fit))
    self.init_one = jax.jit(trainer.init_fit)  # one lane's fresh state (no lane axis), for `put_lane`
    self.epoch_step = jax.jit(self._epoch_step)
    self._evaluate_jit = jax.jit(self._evaluate)

  def evaluate(self, params, masks: Masks, images: jax.Array, labels: jax.Array,
               active: jax.Array | None = None) -> EvalResult:
    """`Trainer.evaluate` for every lane of batched params and masks on the same data. Lanes that
    are not `active` (bool per lane) are not evaluated: their results are zeros."""
    return self._evaluate_jit(params, masks, images, labels, active)

  @staticmethod
  def lane(tree, index: int):
    """Lane `index` of a batched pytree."""
    return jax.tree.map(lambda x: x[index], tree)

  def pad(self, count: int) -> int:
    """The lane count for `count` trials: a multiple of the device count, so lanes split over devices."""
    n = self.trainer.num_devices
    return -(-count // n) * n

  def _over_lanes(self, fn, lanes, shared, skip=None, skip_gives_zeros=False):
    """fn(lane_args..., *shared) for every lane of `lanes` (pytrees with a leading lane axis), in
    chunks of `lanes_per_chunk` lanes. A chunk for which `skip(chunk)` is true is not computed:
    its result is the chunk's first argument, unchanged (or zeros with `skip_gives_zeros`)."""
    num = jax.tree.leaves(lanes)[0].shape[0]
    k = max(d for d in range(1, min(self.lanes_per_chunk, num) + 1) if num % d == 0)
    one = (lambda c: fn(*c, *shared)) if k == 1 else (lambda c: jax.vmap(lambda *a: fn(*a, *shared))(*c))
    if skip_gives_zeros:
      skipped = lambda c: jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), jax.eval_shape(one, c))
    else:
      skipped = lambda c: c[0]
    run = one if skip is None else (lambda c: jax.lax.cond(skip(c), skipped, one, c))
    if k == num and k > 1:
      return run(lanes)
    if k == 1:
      return jax.lax.map(run, lanes)
    chunks = jax.tree.map(lambda x: x.reshape((num // k, k) + x.shape[1:]), lanes)
    out = jax.lax.map(run, chunks)
    return jax.tree.map(lambda x: x.reshape((num,) + x.shape[2:]), out)

  def _split(self, lanes) -> bool:
    """Lanes are split over the devices when there are several and the lane count is a multiple of
    theirs; otherwise every device works on every lane and each batch is split. Across processes
    (--distributed) always the latter: every lane's state is then replicated on every device, so the
    driver's host reads (epochs, done flags, measurements) see whole arrays in every process."""
    n = self.trainer.num_devices
    return n > 1 and jax.process_count() == 1 and jax.tree.leaves(lanes)[0].shape[0] % n == 0

  def _per_device(self, fn: Callable, lanes, shared):
    return jax.shard_map(lambda l, s: fn(l, s), mesh=self.trainer.mesh, in_specs=(P(DATA_AXIS), P()),
                         out_specs=P(DATA_AXIS), check_vma=False)(lanes, shared)

  def _epoch_step(self, state: FitState, data: DeviceData) -> FitState:
    skip = lambda c: jnp.all(c[0].done)
    if self._split(state):
      step = lambda s, d: self.trainer._epoch_step(s, d, split_batch=False)
      return self._per_device(lambda l, s: self._over_lanes(step, (l,), (s,), skip), state, data)
    return self._over_lanes(self.trainer._epoch_step, (state,), (data,), skip)

  def _evaluate(self, params, masks: Masks, images: jax.Array, labels: jax.Array,
                active: jax.Array | None = None) -> EvalResult:
    split = self._split(params)
    ev = lambda p, m, a, x, y: self.trainer._evaluate(p, m, x, y, split_batch=not split)
    if active is None:
      active = jnp.ones(jax.tree.leaves(params)[0].shape[:1], bool)

    def over(lanes, shared):
      return self._over_lanes(ev, lanes, shared, skip=lambda c: ~jnp.any(c[2]), skip_gives_zeros=True)

    if split:
      return self._per_device(over, (params, masks, active), (images, labels))
    return over((params, masks, active), (images, labels))


@jax.jit
def put_lane(state, index: jax.Array, lane):
  """`state` (a pytree with a leading lane axis) with lane `index` replaced by `lane` (no lane axis)."""
  return jax.tree.map(lambda s, x: s.at[index].set(x), state, lane)


@jax.jit
def take_lanes(state, indices: jax.Array):
  """The lanes `indices` (an int array) of `state`, as a pytree with a leading axis of len(indices)."""
  return jax.tree.map(lambda s: s[indices], state)
