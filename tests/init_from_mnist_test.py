"""The magnitude report's pipeline on the real MNIST subset, CPU-sized: pretrain Model A -> save -> load with
--init_from (the run's record, and its torch twin's state_dict) -> one-shot and iterative magnitude pruning to
50/75/90 % -> saved networks that are exactly that sparse. Skipped without /work/shared/data/mnist_subset."""

import os

import numpy as np
import pytest

from dropnet_jax import theta as theta_lib
from dropnet_jax.config import DataConfig, InitFromConfig, ModelConfig, OutputConfig, TrainConfig
from dropnet_jax.loop import magnitude
from dropnet_jax.pruning.weight_masks import named_leaves
from dropnet_jax.runs import magnitude as magnitude_run
from dropnet_jax.runs import saved_params
from tests.conftest import MNIST_DIR

TARGETS = (0.5, 0.75, 0.9)  # Model A (40, 40) has 33,360 prunable weights: each target is a whole number of them


def _config(init_from=None, methods=('oneshot',), sparsities=(0.5,)):
  return magnitude_run.MagnitudeRunConfig(
      model=ModelConfig(name='fc'), data=DataConfig(dataset='mnist', data_dir=str(MNIST_DIR)),
      start=InitFromConfig(init_from), output=OutputConfig(save_params='all', curves=False),
      magnitude=magnitude.MagnitudeConfig(methods=methods, sparsities=sparsities, finetune_epochs=2, round_epochs=1,
                                          final_epochs=2, iterative_fraction=0.5, train=TrainConfig(max_epochs=3)))


def _check_pruned_run(out, dense_test_accuracy):
  records = saved_params.reporting.read_jsonl(os.path.join(out, 'results.jsonl'))
  dense = [r for r in records if r['cycle'] == 0]
  assert {r['test_accuracy'] for r in dense} == {dense_test_accuracy}  # the loaded network, evaluated
  assert all(r['epochs_trained'] == 0 for r in dense)
  finals = [r for r in records if r['stop_reason'] == 'target']
  assert sorted((r['method'], r['target_sparsity']) for r in finals) == sorted(
      (m, t) for m in ('oneshot', 'iterative') for t in TARGETS)
  for r in finals:
    _, theta, wmask, saved = saved_params.load_saved(out, f'seed0/{r["metric"]}/cycle{r["cycle"]}')
    params, masks = named_leaves(theta_lib.params(theta)), named_leaves(wmask)
    total = sum(m.size for m in masks.values())
    zeros = sum(int(np.sum(np.asarray(params[n]) == 0)) for n in masks)
    assert zeros == sum(int(np.sum(m == 0)) for m in masks.values()) == round(r['target_sparsity'] * total)
    assert saved['saved_files']['sparse_bytes'] > 0
  return finals


@pytest.mark.slow
def test_pretrain_save_load_and_prune_on_real_mnist(tmp_path):
  if not MNIST_DIR.is_dir():
    pytest.skip(f'real MNIST files not found at {MNIST_DIR}')
  pre = str(tmp_path / 'pre')
  magnitude_run.run(magnitude_run.prepare(_config(), pre))
  dense = next(r for r in saved_params.reporting.read_jsonl(os.path.join(pre, 'results.jsonl')) if r['cycle'] == 0)
  assert dense['test_accuracy'] > 0.9
  out = str(tmp_path / 'from_run')
  magnitude_run.run(magnitude_run.prepare(_config(pre, ('oneshot', 'iterative'), TARGETS), out))
  _check_pruned_run(out, dense['test_accuracy'])
  # The same network as its torch twin's state_dict: the same dense record, the same exact sparsities.
  torch = pytest.importorskip('torch')
  from tests.torch_reference.compact import to_torch
  model, theta, _, _ = saved_params.load_saved(pre)
  torch.save(to_torch(model, theta, (28, 28, 1)).state_dict(), str(tmp_path / 'ckpt.pth'))
  out = str(tmp_path / 'from_torch')
  magnitude_run.run(magnitude_run.prepare(_config(str(tmp_path / 'ckpt.pth'), ('oneshot', 'iterative'), TARGETS), out))
  _check_pruned_run(out, dense['test_accuracy'])
