"""One saved network scored and counted (`runs.evaluate` resolves which, and reports them).

Scoring is the trainer's own evaluation (`Trainer.evaluate`: eval mode, batch norm with its running
statistics, the run's eval batch size): the very computation that made a record's figures, so a
record's accuracies come out as the float32 values the run recorded. They are compared as counts of
correct predictions (float32 correct / n identifies the count exactly), the losses to `LOSS_RTOL`
(they are the same computation, but a run made on other devices sums in another order). A
weight-pruned θ is saved dense with its pruned weights exactly 0, so it is evaluated as a dense
network: params * mask == params bit for bit.

Sizes (`sizes`): `params` counts the network as stored (a DropNet record: its full-size arrays,
which is what XLA computes); `effective_params` and `macs` are those of the network its unit masks
leave (`compaction.accounting.masked_counts`: its compact network); `nonzero_params` the non-zero
entries among the effective parameters; `sparsity` the zeros among the prunable weights (the saved
weight mask's leaves, else the run's selection: Dense/Conv kernels by default), units removed by
the masks counting as zeros; `global_sparsity` the same over all parameters. A weight-pruned
record's zeros must be exactly its pruned weights (the saved mask's count, or the record's sparsity
for runs saved before masks were). Unstructured zeros do not lower the MACs: they are still
multiplied.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np

from dropnet_jax.runs import saved_params

LOSS_RTOL = 1e-5
SPLITS = ('train', 'val', 'test')


def prunable_mask_names(params: Any, weight_mask: Any, selection: dict[str, bool]) -> tuple[str, ...]:
  """The prunable leaves: the saved weight mask's, else `prunable_names` with the run's selection."""
  from dropnet_jax.pruning.weight_masks import mask_names, prunable_names
  return mask_names(weight_mask) if weight_mask is not None else prunable_names(params, **selection)


def sizes(model, theta, masks, image_shape: Sequence[int], weight_mask: Any = None,
          selection: dict[str, bool] | None = None) -> dict[str, Any]:
  """Params, effective params, non-zero params, sparsity and MACs of one network (module docstring).

  `masks`: the unit masks (all ones for a dense or weight-pruned network); `weight_mask`: the saved
  weight mask (its leaves are the prunable ones; with it, `pruned` counts its zeros)."""
  from dropnet_jax import theta as theta_lib
  from dropnet_jax.compaction import accounting, compact
  from dropnet_jax.pruning.weight_masks import named_leaves, prunable_names
  selection = selection or {'biases': False, 'output_layer': True}
  stored = named_leaves(theta_lib.params(theta))
  prunable = prunable_mask_names(theta_lib.params(theta), weight_mask, selection)
  unit_masked = any(float(np.min(np.asarray(m))) < 0.5 for m in masks if np.size(m))
  if unit_masked:  # the network that computes: its compact form (kernels by name there)
    _, small_theta = compact.compact(model, theta, masks, image_shape=image_shape)
    effective = named_leaves(theta_lib.params(small_theta))
    try:
      kept_prunable = prunable_names(theta_lib.params(small_theta), biases=selection['biases'])
    except ValueError:  # a constant network has no kernels left
      kept_prunable = ()
  else:
    effective, kept_prunable = stored, prunable
  nonzero = {name: int(np.count_nonzero(np.asarray(v))) for name, v in effective.items()}
  params = sum(int(np.size(v)) for v in stored.values())
  prunable_size = sum(int(np.size(stored[n])) for n in prunable)
  nonzero_prunable = sum(nonzero[n] for n in kept_prunable)
  dense, masked = accounting.count(model, image_shape), accounting.masked_counts(model, image_shape, masks)
  out = {'params': params, 'effective_params': masked.params, 'nonzero_params': sum(nonzero.values()),
         'prunable_params': prunable_size, 'zero_prunable': prunable_size - nonzero_prunable,
         'sparsity': 1 - nonzero_prunable / prunable_size if prunable_size else 0.0,
         'global_sparsity': 1 - sum(nonzero.values()) / params if params else 0.0,
         'macs': masked.macs, 'dense_macs': dense.macs, 'counted_params': dense.params}
  if weight_mask is not None:
    out['pruned'] = sum(int(np.size(m)) - int(np.count_nonzero(np.asarray(m)))
                        for m in named_leaves(weight_mask).values())
  return out


def _correct(accuracy: float, n: int) -> int:
  """The count behind a float32 accuracy over n examples (exact: float32 error << 1/(2n))."""
  return int(round(accuracy * n))


def differences(row: dict[str, Any], reference: dict[str, Any]) -> list[str]:
  """What `row` does not reproduce of `reference` (a record, or an export's evaluation): correct counts
  per split (exact), losses (LOSS_RTOL), pruned weights (exact), an export's params and MACs."""
  out = []
  for split in SPLITS:
    if f'{split}_accuracy' not in reference:
      continue
    n, ours = row[f'{split}_examples'], row[f'{split}_correct']
    theirs = _correct(reference[f'{split}_accuracy'], n)
    if ours != theirs:
      out.append(f'{split}: {ours}/{n} correct, the reference {theirs}/{n}')
    loss = reference.get(f'{split}_loss')
    if loss is not None and not np.isclose(row[f'{split}_loss'], loss, rtol=LOSS_RTOL, atol=0):
      out.append(f'{split} loss {row[f"{split}_loss"]:.7g}, the reference {loss:.7g}')
  if 'pruned' in row and row['zero_prunable'] != row['pruned']:
    out.append(f'{row["zero_prunable"]} prunable weights are 0 but the mask prunes {row["pruned"]}')
  elif 'target_sparsity' in reference and 'sparsity' in reference:  # weight pruning saved without its mask
    pruned = _correct(reference['sparsity'], row['prunable_params'])
    if row['zero_prunable'] != pruned:
      out.append(f'{row["zero_prunable"]} prunable weights are 0 but the record prunes {pruned}')
  for key, ours in (('params', 'effective_params'), ('macs', 'macs')):
    if row['source'] == 'export' and reference.get(key) is not None and reference[key] != row[ours]:
      out.append(f'{ours} {row[ours]:,}, the export says {reference[key]:,}')
  return out


class Scorer:
  """Trainers and device data shared by the networks of one evaluation (one compile per model shape)."""

  def __init__(self):
    self._trainers: dict[tuple, Any] = {}
    self._data: dict[int, Any] = {}

  def trainer(self, model, eval_batch_size: int):
    from dropnet_jax.config import TrainConfig
    from dropnet_jax.training.trainer import Trainer
    key = (model, eval_batch_size)
    if key not in self._trainers:
      self._trainers[key] = Trainer(model, TrainConfig(eval_batch_size=eval_batch_size))
    return self._trainers[key]

  def device_data(self, dataset):
    from dropnet_jax.training.trainer import DeviceData
    if id(dataset) not in self._data:
      self._data[id(dataset)] = (dataset, DeviceData.from_dataset(dataset))
    return self._data[id(dataset)][1]

  def score(self, model, theta, masks, dataset, eval_batch_size: int) -> dict[str, Any]:
    """Loss, accuracy and correct count on every split (the trainer's own evaluation)."""
    import jax
    trainer, data = self.trainer(model, eval_batch_size), self.device_data(dataset)
    out = {}
    for split in SPLITS:
      images, labels = getattr(data, f'{split}_images'), getattr(data, f'{split}_labels')
      result = jax.device_get(trainer.evaluate(theta, masks, images, labels))
      n = int(labels.shape[0])
      out.update({f'{split}_accuracy': float(result.accuracy), f'{split}_loss': float(result.loss),
                  f'{split}_examples': n, f'{split}_correct': _correct(float(result.accuracy), n)})
    return out


def load_network(network):
  """(model, θ, unit masks, weight mask or None) of a resolved `evaluate.Network`, read from its files."""
  import jax
  import jax.numpy as jnp
  from dropnet_jax.models.layers import full_masks
  from dropnet_jax.pruning.masks import masks_from_strings
  if network.source == 'export':
    from dropnet_jax.compaction import compact
    model, theta, _ = compact.load(network.path)
    return model, theta, full_masks(model), None
  model, theta, weight_mask, record = saved_params.load_saved(network.path, network.selector)
  theta = jax.tree.map(jnp.asarray, theta)
  masks = masks_from_strings(record['mask']) if 'mask' in record else full_masks(model)
  return model, theta, tuple(jnp.asarray(m) for m in masks), weight_mask


def evaluate_network(network, dataset, scorer: Scorer) -> dict[str, Any]:
  """One `evaluate.Network`'s row: its figures, sizes, the reference's figures and what differs from them."""
  from dropnet_jax.models.compact import model_name
  model, theta, masks, weight_mask = load_network(network)
  r = network.reference
  row: dict[str, Any] = {'network': network.label, 'source': network.source, 'path': os.path.abspath(network.path)}
  if network.source == 'record':
    row.update({'seed': r['seed'], 'metric': r['metric'], 'cycle': r['cycle']})
  row.update({'model': model_name(model), 'widths': [int(w) for w in model.widths], 'dataset': network.data['dataset']})
  row.update(scorer.score(model, theta, masks, dataset, network.eval_batch_size))
  row.update(sizes(model, theta, masks, dataset.image_shape, weight_mask, network.selection))
  if 'saved_files' in r:
    row['saved_files'] = r['saved_files']
  row.update({f'reference_{k}': r[k] for k in ('train_accuracy', 'train_loss', 'val_accuracy', 'val_loss',
                                                'test_accuracy', 'test_loss', 'sparsity', 'params', 'macs')
              if r.get(k) is not None})
  row['differences'] = differences(row, r)
  row['reproduced'] = not row['differences']
  return row
