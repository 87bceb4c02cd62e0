"""Training with early stopping, as pure jitted functions.

One epoch is one compiled program (`lax.scan` over shuffled batches of the
device-resident uint8 data). Early stopping lives in `FitState`, a pytree, and
`epoch_step` advances it by one epoch; a finished state (early-stopped or
diverged) passes through unchanged. That makes the same function usable for
one trial (a Python loop that stops when `done`) and, vmapped, for many trials
at once, and lets a caller checkpoint between any two epochs.

The masks are an input of every step, never a Python value baked into the
trace, so changing the mask between DropNet cycles does not recompile.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from dropnet_jax.models import Masks
from dropnet_jax.pruning import StatSums


class DeviceData(NamedTuple):
  """A dataset's splits as device arrays (images uint8, labels int32)."""
  train_images: jax.Array
  train_labels: jax.Array
  val_images: jax.Array
  val_labels: jax.Array
  test_images: jax.Array
  test_labels: jax.Array

  @classmethod
  def from_dataset(cls, ds) -> 'DeviceData':
    return cls(*(jnp.asarray(a) for a in (ds.train_images, ds.train_labels, ds.val_images,
                                          ds.val_labels, ds.test_images, ds.test_labels)))


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Hyperparameters of one training run (the paper's defaults)."""
  lr: float = 0.1
  batch_size: int = 32
  max_epochs: int = 100
  patience: int = 5
  eval_batch_size: int = 1000


class EvalResult(NamedTuple):
  loss: jax.Array
  accuracy: jax.Array
  sums: StatSums


class FitState(NamedTuple):
  """Everything one training run carries from epoch to epoch."""
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


def _zero_sums(masks: Masks) -> StatSums:
  return StatSums(tuple(jnp.zeros_like(m) for m in masks), tuple(jnp.zeros_like(m) for m in masks),
                  jnp.zeros((), jnp.float32))


def _batch_terms(apply_fn, params, masks, images, labels, weights):
  """Weighted cross-entropy sum, correct count and stat sums of one batch."""
  logits, stats = apply_fn({'params': params}, images, masks)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
  correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
  sums = StatSums(tuple(weights @ s.abs_mean for s in stats), tuple(weights @ s.zero_frac for s in stats),
                  weights.sum())
  return (weights * ce).sum(), (weights * correct).sum(), sums


def _padded_batches(order: jax.Array, batch_size: int) -> tuple[jax.Array, jax.Array]:
  """Splits example indices into full batches; the last is padded with weight 0.

  Keeping every batch the same shape keeps one compiled step, and weight 0
  makes the padding invisible to losses, gradients and statistics.
  """
  n = order.shape[0]
  num_batches = math.ceil(n / batch_size)
  pad = num_batches * batch_size - n
  idx = jnp.concatenate([order, jnp.zeros((pad,), order.dtype)]).reshape(num_batches, batch_size)
  weights = jnp.concatenate([jnp.ones((n,), jnp.float32), jnp.zeros((pad,), jnp.float32)])
  return idx, weights.reshape(num_batches, batch_size)


def _add_sums(a: StatSums, b: StatSums) -> StatSums:
  return jax.tree.map(jnp.add, a, b)


class Trainer:
  """Compiled train/eval programs for one model, optimiser and data shape."""

  def __init__(self, model, config: TrainConfig):
    self.model = model
    self.config = config
    self.tx = optax.sgd(config.lr)
    self.evaluate = jax.jit(self._evaluate)
    self.train_epoch = jax.jit(self._train_epoch)
    self.epoch_step = jax.jit(self._epoch_step)

  # -- one pass -------------------------------------------------------------

  def _evaluate(self, params, masks: Masks, images: jax.Array, labels: jax.Array) -> EvalResult:
    """Mean loss, accuracy and per-unit stat sums over all of (images, labels)."""
    idx, weights = _padded_batches(jnp.arange(images.shape[0]), self.config.eval_batch_size)

    def body(carry, batch):
      loss_sum, correct_sum, sums = carry
      b_idx, b_w = batch
      l, c, s = _batch_terms(self.model.apply, params, masks, images[b_idx], labels[b_idx], b_w)
      return (loss_sum + l, correct_sum + c, _add_sums(sums, s)), None

    init = (jnp.zeros(()), jnp.zeros(()), _zero_sums(masks))
    (loss_sum, correct_sum, sums), _ = jax.lax.scan(body, init, (idx, weights))
    n = images.shape[0]
    return EvalResult(loss_sum / n, correct_sum / n, sums)

  def _train_epoch(self, params, opt_state, masks: Masks, images, labels, key):
    """One shuffled epoch of SGD; returns params, opt_state, mean loss, accuracy, stat sums."""
    order = jax.random.permutation(key, images.shape[0])
    idx, weights = _padded_batches(order, self.config.batch_size)

    def loss_fn(p, x, y, w):
      l, c, s = _batch_terms(self.model.apply, p, masks, x, y, w)
      return l / w.sum(), (l, c, s)

    def body(carry, batch):
      params, opt_state, loss_sum, correct_sum, sums = carry
      b_idx, b_w = batch
      grads, (l, c, s) = jax.grad(loss_fn, has_aux=True)(params, images[b_idx], labels[b_idx], b_w)
      updates, opt_state = self.tx.update(grads, opt_state, params)
      params = optax.apply_updates(params, updates)
      return (params, opt_state, loss_sum + l, correct_sum + c, _add_sums(sums, s)), None

    init = (params, opt_state, jnp.zeros(()), jnp.zeros(()), _zero_sums(masks))
    (params, opt_state, loss_sum, correct_sum, sums), _ = jax.lax.scan(body, init, (idx, weights))
    n = images.shape[0]
    return params, opt_state, loss_sum / n, correct_sum / n, sums

  # -- early stopping -------------------------------------------------------

  def init_fit(self, params0, masks: Masks, key: jax.Array) -> FitState:
    """A fresh run from θ0 (the very arrays given: nothing is re-initialised)."""
    f32 = lambda v: jnp.asarray(v, jnp.float32)
    return FitState(
        params=params0, opt_state=self.tx.init(params0), best_params=params0, best_sums=_zero_sums(masks),
        masks=tuple(masks), key=key, epoch=jnp.zeros((), jnp.int32), best_epoch=jnp.zeros((), jnp.int32),
        best_val_loss=f32(jnp.inf), bad_epochs=jnp.zeros((), jnp.int32), done=jnp.zeros((), bool),
        diverged=jnp.zeros((), bool), train_loss=f32(jnp.nan), train_accuracy=f32(jnp.nan),
        val_loss=f32(jnp.nan), val_accuracy=f32(jnp.nan))

  def _epoch_step(self, state: FitState, data: DeviceData) -> FitState:
    """Trains one epoch and applies the early-stopping rule; a done state is returned unchanged."""
    epoch = state.epoch + 1
    params, opt_state, train_loss, train_acc, sums = self._train_epoch(
        state.params, state.opt_state, state.masks, data.train_images, data.train_labels,
        jax.random.fold_in(state.key, epoch))
    val = self._evaluate(params, state.masks, data.val_images, data.val_labels)
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
        done=diverged | (bad_epochs >= self.config.patience) | (epoch >= self.config.max_epochs),
        diverged=diverged, train_loss=train_loss, train_accuracy=train_acc,
        val_loss=val.loss, val_accuracy=val.accuracy)
    # Freeze finished runs, so a vmapped batch of trials can run until the last one stops.
    return jax.tree.map(lambda o, n: jnp.where(state.done, o, n), state, new)

  def fit(self, state: FitState, data: DeviceData,
          on_epoch: Callable[[FitState], None] | None = None) -> FitState:
    """Runs epochs until early stopping (or divergence, or max_epochs)."""
    while not bool(state.done):
      state = self.epoch_step(state, data)
      if on_epoch is not None:
        on_epoch(state)
    return state
