"""A finished cycle measured: every split evaluated with the lanes' best (and last) θ in one host read.

Apart from the driver because the barrier and the continuous schedules both call it, and what a record
holds (the paper's best-validation-loss figures beside the last epoch's, as the official Keras code
reported) is a concern of its own.
"""

from __future__ import annotations

import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dropnet_jax.loop.state import Outcome
from dropnet_jax.training.trainer import DeviceData, FitState


def measure(runner, state: FitState, data: DeviceData, method: Any, seconds: float,
            active: Sequence[bool]) -> list[Outcome | None]:
  """Evaluates a finished group on every split; an `Outcome` per lane (None for inactive lanes).
  `method` gives `score_from`, `score_params` and `mask_fields` (the record's mask encoding)."""
  start = time.perf_counter()
  masks, best, last = state.masks, state.best_params, state.params
  active_arr = jnp.asarray(np.asarray(active)) if runner.batched else None
  ev = lambda theta, images, labels: runner.evaluate(theta, masks, images, labels, active_arr)
  train = ev(best, data.train_images, data.train_labels)
  val = ev(best, data.val_images, data.val_labels)
  test = ev(best, data.test_images, data.test_labels)
  last_test = ev(last, data.test_images, data.test_labels)
  if method.score_from == 'epoch':
    sums = state.best_sums
  elif method.score_params == 'last':
    sums = ev(last, data.train_images, data.train_labels).sums
  else:
    sums = train.sums
  host = jax.device_get({'masks': masks, 'train': train, 'val': val, 'test': test, 'last_test': last_test,
                         'sums': sums, 'state': state._replace(params=None, opt_state=None, best_params=None,
                                                               best_sums=None, key=None, masks=None)})
  if not runner.batched:  # one trial: give every leaf a lane axis of 1
    host = jax.tree.map(lambda x: np.asarray(x)[None], host)
  seconds += time.perf_counter() - start
  s = host['state']
  out = []
  for t, is_active in enumerate(active):
    if not is_active:
      out.append(None)
      continue
    f = lambda x: float(x[t])
    lane_mask = jax.tree.map(lambda x: x[t], host['masks'])
    mask_fields = method.mask_fields(lane_mask)
    fields = {
        **{k: v for k, v in mask_fields.items() if k != 'mask'},
        # At the best-validation-loss epoch (the paper's definition).
        'train_accuracy': f(host['train'].accuracy), 'train_loss': f(host['train'].loss),
        'val_accuracy': f(host['val'].accuracy), 'val_loss': f(host['val'].loss),
        'test_accuracy': f(host['test'].accuracy), 'test_loss': f(host['test'].loss),
        # At the last epoch trained (what the official Keras code reported).
        'last_train_accuracy': f(s.train_accuracy), 'last_train_loss': f(s.train_loss),
        'last_val_accuracy': f(s.val_accuracy), 'last_val_loss': f(s.val_loss),
        'last_test_accuracy': f(host['last_test'].accuracy), 'last_test_loss': f(host['last_test'].loss),
        'early_stop_epoch': int(s.best_epoch[t]), 'epochs_trained': int(s.epoch[t]),
        'diverged': bool(s.diverged[t]),
        **({'mask': mask_fields['mask']} if 'mask' in mask_fields else {}),
        'seconds': seconds,
    }
    if fields['epochs_trained'] == 0:  # a network evaluated as given (loaded): its last epoch is its start
      fields.update({f'last_{k}': fields[k] for k in ('train_accuracy', 'train_loss', 'val_accuracy', 'val_loss')})
    lane_sums = jax.tree.map(lambda x: jnp.asarray(x[t]), host['sums'])
    best_theta = runner.lane(best, t)
    score_theta = best_theta if method.score_params == 'best' else runner.lane(last, t)
    out.append(Outcome(fields, lane_sums, best_theta, score_theta))
  return out
