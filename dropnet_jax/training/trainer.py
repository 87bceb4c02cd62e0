"""Training with early stopping, as pure jitted functions.

One epoch is one compiled program (`lax.scan` over shuffled batches of the
device-resident uint8 data). Early stopping lives in `FitState`, a pytree, and
`epoch_step` advances it by one epoch; a finished state (early-stopped or
diverged) passes through unchanged. That makes the same function usable for
one trial (a Python loop that stops when `done`) and for many trials at once
(`dropnet_jax.training.lanes`: every state leaf has a leading trial axis, one
compiled program advances all trials, finished ones are not recomputed), and
lets a caller checkpoint between any two epochs (`fit` is the one host loop).

The masks are an input of every step, never a Python value baked into the
trace, so changing the mask between DropNet cycles does not recompile.

Data parallelism: every step gathers its batch from the (replicated) dataset
and constrains it to be split over the 'data' axis of `Trainer.mesh` (all
local devices by default); parameters and optimiser state stay replicated, so
XLA inserts one gradient all-reduce per step. With one device the constraints
are left out and the programs are exactly the single-device ones. Batched
trials are instead split over the devices by trial when their count allows
(no per-step communication at all).

Batch norm: θ may be a plain params tree (models without batch norm) or a
Flax variables dict `{'params': ..., 'batch_stats': ...}` (e.g. from
`models.init_params` for such models; `dropnet_jax.theta` tells the two
apart). With 'batch_stats', training applies the model with `train=True,
mutable=['batch_stats']` and carries the running statistics inside θ (so
`FitState.params`/`best_params` are variables dicts, and θ0 includes the
initial statistics); evaluation uses `train=False`. Only 'params' is
optimised. In training the last, partial batch of an epoch is run at its true
size (not padded), so padding never enters the batch statistics.

Speed (per step, everything stays on the device): the epoch's shuffled
training images are gathered once per epoch as whole rows (small datasets)
or per step; the shuffle is `jax.random.permutation`'s exact order computed
with cheaper sorts (`shuffle_order`); the loss, accuracy and unit statistics
accumulate elementwise per batch row and are reduced once per pass; on CPU,
convolution and max-pool gradients are rewritten into forms XLA:CPU runs
fast inside loops (`cpu_grads.with_fast_grads`).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from dropnet_jax import theta as theta_lib
from dropnet_jax.config import TrainConfig
from dropnet_jax.training.augment import batch_augmenter
from dropnet_jax.training.batches import padded_batches, RowSums, take_rows, cross_entropy, shuffle_order
from dropnet_jax.training.cpu_grads import with_fast_grads
from dropnet_jax.models.layers import Masks, StatSums, full_masks, zero_sums
from dropnet_jax.training.optim import make_optimizer
from dropnet_jax.pruning.weight_masks import apply_weight_mask, masked_updates

DATA_AXIS = 'data'
AUGMENT_SALT = 0xA06  # the augmentation key of an epoch: fold_in(epoch key, salt); the shuffle uses the epoch key
DROPOUT_SALT = 0xD40  # dropout's key of step i: fold_in(fold_in(epoch key, salt), i)


class DeviceData(NamedTuple):
  """A dataset's splits as device arrays (images uint8, labels int32)."""
  train_images: jax.Array
  train_labels: jax.Array
  val_images: jax.Array
  val_labels: jax.Array
  test_images: jax.Array
  test_labels: jax.Array

  @classmethod
  def from_dataset(cls, ds, sharding: jax.sharding.Sharding | None = None) -> 'DeviceData':
    """Copies a host Dataset to the device once (replicated over `sharding`'s devices if given)."""
    arrays = (ds.train_images, ds.train_labels, ds.val_images, ds.val_labels, ds.test_images, ds.test_labels)
    if sharding is not None:
      return cls(*(jax.device_put(np.asarray(a), sharding) for a in arrays))
    return cls(*(jnp.asarray(a) for a in arrays))


class EvalResult(NamedTuple):
  loss: jax.Array
  accuracy: jax.Array
  sums: StatSums


class FitState(NamedTuple):
  """Everything one training run carries from epoch to epoch.

  `params`/`best_params` are θ in the form given to `init_fit`: a params tree,
  or a variables dict with 'batch_stats' for batch-norm models.
  """
  params: Any
  opt_state: Any
  best_params: Any
  best_sums: StatSums  # running post-activation sums of the best epoch (--score_from=epoch)
  masks: Masks
  key: jax.Array  # shuffling key; epoch e shuffles with fold_in(key, e)
  epoch: jax.Array  # epochs trained so far
  best_epoch: jax.Array  # 1-based epoch of the lowest validation loss (0 before any)
  best_val_loss: jax.Array
  bad_epochs: jax.Array  # epochs since the validation loss last improved
  done: jax.Array  # early-stopped, diverged or at max_epochs
  diverged: jax.Array  # a non-finite training or validation loss was seen
  train_loss: jax.Array  # running mean over the last epoch's batches
  train_accuracy: jax.Array
  val_loss: jax.Array  # of the last epoch
  val_accuracy: jax.Array
  max_epochs: jax.Array  # this run's epoch limit (config.max_epochs unless a method sets a cycle's own)


# θ is a params tree, or a variables dict with batch statistics: see `dropnet_jax.theta`.


def data_mesh(devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """A 1-D mesh with axis 'data' over `devices` (default: all local devices)."""
  devices = list(jax.local_devices() if devices is None else devices)
  return jax.make_mesh((len(devices),), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=devices)


class Trainer:
  """Compiled train/eval programs for one model, optimiser and data shape.

  `devices`: the devices each batch (or, for batched trials, the set of
  trials) is split over (default: all local
  devices; `config.batch_size` must be a multiple of their number). `unroll`:
  scan steps unrolled per loop iteration of the training epoch.
  `gather_per_epoch`: gather the shuffled training images once per epoch
  (one copy of the training set, then contiguous slices per step; faster
  for small images) instead of per step; None: when the training images
  take at most 64 MiB. `fast_grads`: compute the training gradients of
  convolutions and max pools with `with_fast_grads` (None: on CPU, where
  XLA runs autodiff's versions slowly inside loops).
  `steps_per_epoch`: optimiser steps per epoch (ceil(training examples /
  batch size)), which converts the epoch-based learning-rate schedules into
  steps; needed for every schedule but 'constant'.
  `weight_masks`: the masks of `init_fit`/`evaluate` are weight masks
  (`dropnet_jax.pruning.weight_masks`: a 0/1 array per prunable kernel of the
  'params' collection) instead of node masks: the forward pass uses
  params * mask with every unit kept, and the optimiser update is masked so a
  pruned weight stays exactly 0 (`weight_masks.masked_updates`).
  """

  def __init__(self, model, config: TrainConfig, *, devices: Sequence[jax.Device] | None = None,
               unroll: int = 1, gather_per_epoch: bool | None = None, fast_grads: bool | None = None,
               steps_per_epoch: int | None = None, weight_masks: bool = False):
    self.model = model
    self.config = config
    self.weight_masks = weight_masks
    if steps_per_epoch is None and config.optim.schedule != 'constant':
      raise ValueError(f'the {config.optim.schedule} schedule needs steps_per_epoch (training examples / batch size)')
    # A fresh optimiser state with θ0 every cycle (init_fit), as the paper's SGD restarts.
    self.tx = make_optimizer(config.optim, steps_per_epoch or 1, config.max_epochs)
    if weight_masks:
      self.tx = masked_updates(self.tx)
    self.unroll = unroll
    self.gather_per_epoch = gather_per_epoch
    self.mesh = data_mesh(devices)
    self.num_devices = self.mesh.size
    if fast_grads is None:
      fast_grads = self.mesh.devices.flat[0].platform == 'cpu'
    self.fast_grads = fast_grads
    if config.batch_size % self.num_devices:
      raise ValueError(f'batch_size {config.batch_size} is not a multiple of the {self.num_devices} devices the '
                       'batch is split over; choose a multiple, or pass devices= (e.g. jax.local_devices()[:1])')
    self.replicated = NamedSharding(self.mesh, P())
    self._split_batch = NamedSharding(self.mesh, P(DATA_AXIS))
    self.evaluate = jax.jit(self._evaluate)
    self.train_epoch = jax.jit(self._train_epoch)
    self.epoch_step = jax.jit(self._epoch_step)

  def eval_batch_size(self, n: int) -> int:
    """The evaluation batch for n examples: at most config.eval_batch_size, as even as possible so
    the last batch is barely padded, and a multiple of the device count (evaluation only sums
    per-example terms, so the batching does not change the result beyond float rounding)."""
    batches = max(1, -(-n // self.config.eval_batch_size))
    size = max(1, -(-n // batches))
    return -(-size // self.num_devices) * self.num_devices

  # -- placement ------------------------------------------------------------

  def replicate(self, tree):
    """Places a pytree (e.g. DeviceData) on every device of the mesh, once."""
    return jax.device_put(tree, self.replicated)

  def _batch_constraint(self, tree, split: bool = True):
    """The gathered batch (leading axis) is split over the 'data' axis; a no-op on one device
    (or with split=False: inside a per-device program of lanes split over the devices)."""
    if self.num_devices == 1 or not split:
      return tree

    def one(x):
      if x.shape[0] % self.num_devices:
        return x  # a remainder batch that does not split evenly runs replicated
      return jax.lax.with_sharding_constraint(x, self._split_batch)
    return jax.tree.map(one, tree)

  def _replicated_constraint(self, tree, split: bool = True):
    if self.num_devices == 1 or not split:
      return tree
    return jax.lax.with_sharding_constraint(tree, self.replicated)

  # -- the model --------------------------------------------------------------

  def unit_masks(self, masks):
    """The node masks the model gets: `masks` themselves, or all units for weight masks."""
    return full_masks(self.model) if self.weight_masks else tuple(masks)

  @property
  def uses_dropout(self) -> bool:
    return bool(getattr(self.model, 'dropout', 0.0))

  def _apply(self, params, batch_stats, masks, images, train: bool, dropout_key=None):
    """(logits, stats, new batch_stats). `dropout_key`: the step's key of the 'dropout' stream
    (training with dropout only)."""
    if self.weight_masks:  # inside the differentiated function: pruned weights get zero gradient
      params, masks = apply_weight_mask(params, masks), full_masks(self.model)
    train_dropout = train and self.uses_dropout
    if train_dropout and dropout_key is None:
      raise ValueError('a training step with dropout needs its dropout key')
    if batch_stats is None and not train_dropout:
      apply = lambda p, x, m: self.model.apply(theta_lib.variables_from(p), x, m, train=train)
      if train and self.fast_grads:
        apply = with_fast_grads(apply)
      logits, stats = apply(params, images, masks)
      return logits, stats, None
    if not train:
      logits, stats = self.model.apply(theta_lib.variables_from(params, batch_stats), images, masks, train=False)
      return logits, stats, batch_stats
    mutable = [theta_lib.BATCH_STATS] if batch_stats is not None else False

    def apply(p, b, x, m, k):
      rngs = {'dropout': k} if train_dropout else None
      out = self.model.apply(theta_lib.variables_from(p, b), x, m, train=True, mutable=mutable, rngs=rngs)
      return out if mutable else (out, {})
    if self.fast_grads:
      apply = with_fast_grads(apply)
    key = dropout_key if train_dropout else jnp.zeros((), jnp.uint32)
    (logits, stats), updates = apply(params, batch_stats, images, masks, key)
    return logits, stats, updates.get(theta_lib.BATCH_STATS)

  # -- one pass -------------------------------------------------------------

  def _evaluate(self, params, masks: Masks, images: jax.Array, labels: jax.Array, *,
                split_batch: bool = True) -> EvalResult:
    """Mean loss, accuracy and per-unit stat sums over all of (images, labels)."""
    params, batch_stats = theta_lib.split(params)
    bs = self.eval_batch_size(images.shape[0])
    idx, weights = padded_batches(jnp.arange(images.shape[0]), bs)

    def body(acc, batch):
      b_idx, w = batch
      x, y, w = self._batch_constraint((take_rows(images, b_idx), take_rows(labels, b_idx), w), split_batch)
      logits, stats, _ = self._apply(params, batch_stats, masks, x, train=False)
      return acc.add(w, cross_entropy(logits, y), logits, y, stats), None

    acc, _ = jax.lax.scan(body, RowSums.zeros(bs, self.unit_masks(masks)), (idx, weights))
    loss_sum, correct_sum, abs_sum, zero_sum = acc.totals()
    n = images.shape[0]
    return EvalResult(loss_sum / n, correct_sum / n, StatSums(abs_sum, zero_sum, jnp.asarray(n, jnp.float32)))

  def _train_epoch(self, params, opt_state, masks: Masks, images, labels, key, *, split_batch: bool = True):
    """One shuffled epoch of SGD; returns θ, opt_state, mean loss, accuracy, stat sums."""
    theta = params
    params, batch_stats = theta_lib.split(theta)
    n, bs = images.shape[0], self.config.batch_size
    # Keras' fit(shuffle=False) order (the official notebook) when shuffling is off.
    order = shuffle_order(key, n) if self.config.shuffle else jnp.arange(n, dtype=jnp.int32)
    tail = n % bs if batch_stats is not None else 0  # batch norm: the partial batch runs at its size
    idx, weights = padded_batches(order[:n - tail], bs)
    counts = weights.sum(axis=1)
    per_epoch = self.gather_per_epoch
    if per_epoch is None:
      per_epoch = images.size * images.dtype.itemsize <= 64 << 20
    augment = self._augmenter(jax.random.fold_in(key, AUGMENT_SALT))
    dropout_key = jax.random.fold_in(key, DROPOUT_SALT)

    def step(carry, x, y, w, count, i):
      params, batch_stats, opt_state, acc = carry

      def loss_fn(p):
        logits, stats, new_bs = self._apply(p, batch_stats, masks, x, train=True,
                                            dropout_key=jax.random.fold_in(dropout_key, i))
        ce = cross_entropy(logits, y)
        return (w * ce).sum() / count, (logits, ce, stats, new_bs)

      grads, (logits, ce, stats, new_bs) = jax.grad(loss_fn, has_aux=True)(params)
      extra = {'weight_mask': masks} if self.weight_masks else {}
      updates, opt_state = self.tx.update(grads, opt_state, params, **extra)
      params = self._replicated_constraint(optax.apply_updates(params, updates), split_batch)
      return params, new_bs, opt_state, acc, (w, ce, logits, y, stats)

    if per_epoch:  # the epoch's batches in order, as one array: steps slice it contiguously
      rows = jnp.take(images.reshape(n, -1), idx, axis=0, mode='clip')  # (batches, bs, pixels): see take_rows
      batches = (rows, take_rows(labels, idx), weights, counts)
    else:
      batches = (idx, weights, counts)

    def body(carry, i):
      # Batch i is sliced here rather than scanned over as `xs`: vmapped (many trials), scanned
      # xs would need the per-epoch arrays transposed to batch-major first, a copy of all of them.
      batch = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, keepdims=False), batches)
      if per_epoch:
        x, y, w, count = batch
        x = x.reshape(x.shape[:1] + images.shape[1:])
      else:
        b_idx, w, count = batch
        x, y = take_rows(images, b_idx), take_rows(labels, b_idx)
      x, y, w = self._batch_constraint((augment(x, i), y, w), split_batch)
      params, new_bs, opt_state, acc, terms = step(carry, x, y, w, count, i)
      return (params, new_bs, opt_state, acc.add(*terms)), None

    init = (params, batch_stats, opt_state, RowSums.zeros(bs, self.unit_masks(masks)))
    if idx.shape[0]:
      (params, batch_stats, opt_state, acc), _ = jax.lax.scan(body, init, jnp.arange(idx.shape[0]),
                                                               unroll=self.unroll)
    else:  # batch norm with fewer examples than one batch: the epoch is its partial batch alone
      acc = init[-1]
    loss_sum, correct_sum, abs_sum, zero_sum = acc.totals()
    if tail:
      t_idx = order[n - tail:]
      x = augment(take_rows(images, t_idx), idx.shape[0])
      x, y, w = self._batch_constraint((x, take_rows(labels, t_idx), jnp.ones((tail,), jnp.float32)), split_batch)
      params, batch_stats, opt_state, _, terms = step((params, batch_stats, opt_state, None), x, y, w,
                                                      jnp.asarray(tail, jnp.float32), idx.shape[0])
      l, c, a, z = RowSums.zeros(tail, self.unit_masks(masks)).add(*terms).totals()
      loss_sum, correct_sum = loss_sum + l, correct_sum + c
      abs_sum = tuple(map(jnp.add, abs_sum, a))
      zero_sum = tuple(map(jnp.add, zero_sum, z))
    sums = StatSums(abs_sum, zero_sum, jnp.asarray(n, jnp.float32))
    return theta_lib.join(theta, params, batch_stats), opt_state, loss_sum / n, correct_sum / n, sums

  def _augmenter(self, key: jax.Array) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """(batch images, batch index) -> the batch as trained on: with --augment, random crops (zero
    padding 4) and/or flips, then AutoAugment, drawn from (epoch key, batch index), so a resumed run sees
    the same ones (augment.batch_augmenter)."""
    return batch_augmenter(self.config.augment, key)

  # -- early stopping -------------------------------------------------------

  def init_fit(self, params0, masks: Masks, key: jax.Array) -> FitState:
    """A fresh run from θ0 (the very arrays given: nothing is re-initialised)."""
    params0 = theta_lib.normalise(params0)
    f32 = lambda v: jnp.asarray(v, jnp.float32)
    return FitState(
        params=params0, opt_state=self.tx.init(theta_lib.params(params0)), best_params=params0,
        best_sums=zero_sums(self.unit_masks(masks)), masks=masks if self.weight_masks else tuple(masks), key=key,
        epoch=jnp.zeros((), jnp.int32),
        best_epoch=jnp.zeros((), jnp.int32), best_val_loss=f32(jnp.inf), bad_epochs=jnp.zeros((), jnp.int32),
        done=jnp.zeros((), bool), diverged=jnp.zeros((), bool), train_loss=f32(jnp.nan),
        train_accuracy=f32(jnp.nan), val_loss=f32(jnp.nan), val_accuracy=f32(jnp.nan),
        max_epochs=jnp.asarray(self.config.max_epochs, jnp.int32))

  def _epoch_step(self, state: FitState, data: DeviceData, *, split_batch: bool = True) -> FitState:
    """Trains one epoch and applies the early-stopping rule; a done state is returned unchanged."""
    epoch = state.epoch + 1
    params, opt_state, train_loss, train_acc, sums = self._train_epoch(
        state.params, state.opt_state, state.masks, data.train_images, data.train_labels,
        jax.random.fold_in(state.key, epoch), split_batch=split_batch)
    val = self._evaluate(params, state.masks, data.val_images, data.val_labels, split_batch=split_batch)
    diverged = ~jnp.isfinite(train_loss) | ~jnp.isfinite(val.loss)
    improved = (val.loss < state.best_val_loss) & ~diverged
    bad_epochs = jnp.where(improved, 0, state.bad_epochs + 1)
    pick = lambda new, old: jax.tree.map(lambda n, o: jnp.where(improved, n, o), new, old)
    new = FitState(
        # A diverged epoch's params are not kept: the run stops on the last finite ones.
        params=jax.tree.map(lambda n, o: jnp.where(diverged, o, n), params, state.params),
        opt_state=jax.tree.map(lambda n, o: jnp.where(diverged, o, n), opt_state, state.opt_state),
        best_params=pick(params, state.best_params), best_sums=pick(sums, state.best_sums),
        masks=state.masks, key=state.key, epoch=epoch,
        best_epoch=jnp.where(improved, epoch, state.best_epoch),
        best_val_loss=jnp.where(improved, val.loss, state.best_val_loss),
        bad_epochs=bad_epochs,
        done=diverged | (bad_epochs >= self.config.patience) | (epoch >= state.max_epochs),
        diverged=diverged, train_loss=train_loss, train_accuracy=train_acc,
        val_loss=val.loss, val_accuracy=val.accuracy, max_epochs=state.max_epochs)
    # Freeze finished runs, so a vmapped batch of trials can run until the last one stops.
    return jax.tree.map(lambda o, n: jnp.where(state.done, o, n), state, new)


def steps_per_epoch(num_train: int, batch_size: int) -> int:
  """Optimiser steps in one epoch: every batch, the last (padded or partial) one included."""
  return -(-num_train // batch_size)


def fit(epoch_step: Callable[[FitState, DeviceData], FitState], state: FitState, data: DeviceData,
        on_epoch: Callable[[FitState], None] | None = None) -> FitState:
  """Runs epochs until early stopping (or divergence, or max_epochs) of every lane: the one host
  loop, for one trial (`Trainer.epoch_step`) or many (`Lanes.epoch_step`). `on_epoch` sees each
  new state (logging, mid-cycle checkpoints); one small host read of `done` per epoch."""
  while not np.all(np.asarray(state.done)):
    state = epoch_step(state, data)
    if on_epoch is not None:
      on_epoch(state)
  return state
