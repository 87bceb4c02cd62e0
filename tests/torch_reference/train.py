"""SGD with early stopping in plain PyTorch, mirroring dropnet_jax.training.trainer.

The data are tensors in memory (uint8 images, int64 labels); no DataLoader.
The batch order of every epoch is given explicitly (`order_fn(epoch)` returns a
permutation of the training indices, epochs counted from 1) so a parity test
can feed exactly the order dropnet_jax uses. The last batch of an epoch is the
smaller remainder; dropnet_jax pads it with weight-0 examples, which gives the
same mean loss and gradient.

Early stopping is dropnet_jax.training.trainer.Trainer._epoch_step's rule: after each
epoch the validation loss is computed; an improvement (strictly lower, finite
losses) keeps a copy of the parameters and resets the patience counter; the
run stops after `patience` epochs without improvement, at `max_epochs`, or
when a training or validation loss is not finite (then the parameters of the
last finite epoch are kept).
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from dropnet_jax.config import TrainConfig
from tests.torch_reference.models import Masks

StateDict = dict[str, torch.Tensor]


class TorchData(NamedTuple):
  train_images: torch.Tensor
  train_labels: torch.Tensor
  val_images: torch.Tensor
  val_labels: torch.Tensor
  test_images: torch.Tensor
  test_labels: torch.Tensor

  @classmethod
  def from_arrays(cls, *arrays) -> 'TorchData':
    """From numpy (or jax) arrays in TorchData's field order; labels become int64."""
    out = []
    for i, a in enumerate(arrays):
      out.append(torch.from_numpy(np.array(a, np.int64) if i % 2 else np.array(a)))
    return cls(*out)

  @classmethod
  def from_dataset(cls, ds) -> 'TorchData':
    return cls.from_arrays(ds.train_images, ds.train_labels, ds.val_images, ds.val_labels,
                           ds.test_images, ds.test_labels)


class StatSums(NamedTuple):
  abs_sum: tuple[torch.Tensor, ...]
  zero_sum: tuple[torch.Tensor, ...]
  count: torch.Tensor


class EvalResult(NamedTuple):
  loss: float
  accuracy: float
  sums: StatSums


class EpochResult(NamedTuple):
  loss: float  # mean over the epoch's examples
  accuracy: float
  sums: StatSums | None  # running stat sums (only when asked for)
  step_losses: torch.Tensor  # mean loss of every SGD step, in order


def _zero_sums(masks: Masks) -> StatSums:
  return StatSums(tuple(torch.zeros_like(m) for m in masks), tuple(torch.zeros_like(m) for m in masks),
                  torch.zeros(()))


def _add_stats(sums: StatSums, stats) -> StatSums:
  return StatSums(tuple(a + s.abs_mean.sum(0) for a, s in zip(sums.abs_sum, stats)),
                  tuple(z + s.zero_frac.sum(0) for z, s in zip(sums.zero_sum, stats)),
                  sums.count + stats[0].abs_mean.shape[0])


def snapshot(model: torch.nn.Module) -> StateDict:
  return {k: v.detach().clone() for k, v in model.state_dict().items()}


@dataclasses.dataclass
class FitResult:
  """What one early-stopped run ends with (the fields of dropnet_jax's FitState)."""
  params: StateDict  # the last finite epoch's parameters
  best_params: StateDict
  best_sums: StatSums | None
  epoch: int = 0
  best_epoch: int = 0
  best_val_loss: float = math.inf
  bad_epochs: int = 0
  done: bool = False
  diverged: bool = False
  train_loss: float = math.nan
  train_accuracy: float = math.nan
  val_loss: float = math.nan
  val_accuracy: float = math.nan
  epoch_seconds: list[float] = dataclasses.field(default_factory=list)


class Trainer:
  """Trains `model` (in place) with torch.optim.SGD and softmax cross-entropy."""

  def __init__(self, model: torch.nn.Module, config: TrainConfig):
    self.model = model
    self.config = config

  @torch.no_grad()
  def evaluate(self, masks: Masks, images: torch.Tensor, labels: torch.Tensor) -> EvalResult:
    """Mean loss, accuracy and per-unit stat sums of the model's current parameters."""
    self.model.eval()
    loss_sum, correct, sums = 0.0, 0, _zero_sums(masks)
    for start in range(0, len(labels), self.config.eval_batch_size):
      x = images[start:start + self.config.eval_batch_size]
      y = labels[start:start + self.config.eval_batch_size]
      logits, stats = self.model(x, masks)
      loss_sum += F.cross_entropy(logits, y, reduction='sum').item()
      correct += (logits.argmax(1) == y).sum().item()
      sums = _add_stats(sums, stats)
    n = len(labels)
    return EvalResult(loss_sum / n, correct / n, sums)

  def train_epoch(self, optimizer: torch.optim.Optimizer, masks: Masks, images: torch.Tensor,
                  labels: torch.Tensor, order, with_sums: bool = False) -> EpochResult:
    """One epoch of SGD over `order` (indices into images) in batches of batch_size."""
    self.model.train()
    order = torch.from_numpy(np.array(order, np.int64))
    bs = self.config.batch_size
    losses, correct, sums = [], torch.zeros((), dtype=torch.long), _zero_sums(masks) if with_sums else None
    for start in range(0, len(order), bs):
      idx = order[start:start + bs]
      x, y = images[idx], labels[idx]
      logits, stats = self.model(x, masks, with_stats=with_sums)
      loss = F.cross_entropy(logits, y)
      optimizer.zero_grad(set_to_none=True)
      loss.backward()
      optimizer.step()
      losses.append(loss.detach())
      with torch.no_grad():
        correct += (logits.argmax(1) == y).sum()
        if with_sums:
          sums = _add_stats(sums, stats)
    step_losses = torch.stack(losses)
    sizes = torch.full((len(losses),), float(bs))
    sizes[-1] = len(order) - bs * (len(losses) - 1)
    n = len(order)
    return EpochResult(float((step_losses * sizes).sum()) / n, int(correct) / n, sums, step_losses)

  def fit(self, params0: StateDict, masks: Masks, data, order_fn: Callable[[int], Any],
          with_sums: bool = False, on_epoch: Callable[[FitResult], None] | None = None) -> FitResult:
    """Early-stopped training from `params0`; leaves the last finite params in the model."""
    self.model.load_state_dict(params0)
    optimizer = torch.optim.SGD(self.model.parameters(), lr=self.config.lr)
    state = FitResult(params=snapshot(self.model), best_params=snapshot(self.model),
                      best_sums=_zero_sums(masks) if with_sums else None)
    while not state.done:
      start = time.perf_counter()
      state.epoch += 1
      before = state.params
      ep = self.train_epoch(optimizer, masks, data.train_images, data.train_labels, order_fn(state.epoch),
                            with_sums)
      val = self.evaluate(masks, data.val_images, data.val_labels)
      diverged = not (math.isfinite(ep.loss) and math.isfinite(val.loss))
      improved = val.loss < state.best_val_loss and not diverged
      state.bad_epochs = 0 if improved else state.bad_epochs + 1
      if diverged:  # stop on the last finite parameters
        self.model.load_state_dict(before)
      else:
        state.params = snapshot(self.model)
      if improved:
        state.best_params, state.best_sums = state.params, ep.sums
        state.best_epoch, state.best_val_loss = state.epoch, val.loss
      state.diverged = diverged
      state.done = diverged or state.bad_epochs >= self.config.patience or state.epoch >= self.config.max_epochs
      state.train_loss, state.train_accuracy = ep.loss, ep.accuracy
      state.val_loss, state.val_accuracy = val.loss, val.accuracy
      state.epoch_seconds.append(time.perf_counter() - start)
      if on_epoch is not None:
        on_epoch(state)
    return state
