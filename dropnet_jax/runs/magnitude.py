"""A weight magnitude pruning run as one library call: `MagnitudeRunConfig` and a directory in,
records, the report's table and the figure out.

Every method (one-shot, iterative fine-tuning, lottery tickets and their re-init control) runs in the
one loop at weight granularity (`loop.magnitude`), all methods x targets x seeds as lanes of one group,
resumable like DropNet. The run directory gets config.json, results.jsonl/.csv (one record per trial
and cycle), table.md (method x target sparsity -> test-accuracy drop against the dense network),
test_accuracy_vs_weights.png, the learning curves (`runs.curves`: metrics.jsonl, tb/,
learning_curves.png) and, with save_params, the trained networks in params/ (`runs.saved_params`:
dense θ with the pruned weights exactly 0, beside it the weight mask and a compressed sparse form,
`runs.sparse_params`; table.md lists their sizes on disk; `saved_params.load_saved` reads them back).

With `--init_from` (`runs.init_from`) the dense network is loaded instead of trained (the magnitude
report's pipeline: pretrain, save, load, prune one-shot or iteratively, fine-tune, save).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from dropnet_jax.config import DataConfig, InitFromConfig, ModelConfig, OutputConfig
from dropnet_jax.input_pipeline import dataset_fingerprint, input_norm_for, load_dataset
from dropnet_jax.loop import magnitude
from dropnet_jax.models import model_from_config
from dropnet_jax.models.compact import spec_of
from dropnet_jax.runs import curves, reporting, saved_params, sparse_params
from dropnet_jax.runs.experiment import load_start, start_inputs
from dropnet_jax.runs.run_dir import RunDir
from dropnet_jax.settings import setting
from dropnet_jax.training.trainer import DeviceData, Trainer, steps_per_epoch


@dataclasses.dataclass(frozen=True)
class MagnitudeRunConfig:
  """`experiments.magnitude`: weight pruning methods side by side on one model and dataset."""
  model: ModelConfig = ModelConfig()
  start: InitFromConfig = InitFromConfig()
  data: DataConfig = DataConfig()
  seeds: int = setting(1, 'Number of seeds, run as 0..N-1.', flag='seeds')
  magnitude: magnitude.MagnitudeConfig = magnitude.MagnitudeConfig()
  dropnet_run: str | None = setting(None, 'A DropNet run directory whose min/min_layer records join the figure '
                                    '(placed by the weights of their compact networks).', flag='dropnet_run',
                                    result=False)
  output: OutputConfig = OutputConfig(save_params='last')

  def validate(self) -> None:
    if self.seeds < 1:
      raise ValueError(f'seeds must be >= 1, got {self.seeds}')
    self.start.validate()
    self.magnitude.validate()
    self.output.validate()
    if self.dropnet_run and not os.path.isfile(os.path.join(self.dropnet_run, 'results.jsonl')):
      raise ValueError(f'--dropnet_run: no results.jsonl in {self.dropnet_run}')


@dataclasses.dataclass
class Setup:
  config: MagnitudeRunConfig
  model: Any
  dataset: Any
  run_dir: RunDir
  trainer: Trainer
  start_theta: Any = None  # --init_from's network, loaded and checked against the model at prepare


def prepare(config: MagnitudeRunConfig, out: str) -> Setup:
  """Every check before any work, then the data; ValueError names the problem."""
  config.validate()
  model_from_config(config.model, 10)  # before the data
  run_dir = RunDir(out, 'magnitude', config, inputs=[config.dropnet_run or '', *start_inputs(config.start.init_from)])
  run_dir.check()
  d = config.data
  dataset = load_dataset(d.dataset, d.data_dir, split_seed=d.split_seed)
  run_dir.data_fingerprint = dataset_fingerprint(dataset)
  run_dir.check()
  model = model_from_config(config.model, dataset.num_classes, input_norm_for(config.data.normalize, dataset))
  train = config.magnitude.train
  trainer = Trainer(model, train, weight_masks=True,
                    steps_per_epoch=steps_per_epoch(len(dataset.train_labels), train.batch_size))
  start_theta = load_start(config.start.init_from, model, dataset.image_shape)
  return Setup(config, model, dataset, run_dir, trainer, start_theta)


def run(setup: Setup) -> tuple[list[dict[str, Any]], str]:
  """Runs (or resumes) every method into the run directory; returns (records, the table)."""
  config, run_dir, d = setup.config, setup.run_dir, setup.dataset
  spec = {**spec_of(setup.model), 'image_shape': list(d.image_shape)}
  mode = 'none' if config.output.save_params == 'none' else ('all' if config.output.save_params == 'all' else 'last')
  title = reporting.run_title(config.model.name, setup.model.widths, config.data.dataset)
  with run_dir.open(config.output.max_checkpoints), \
      curves.for_run(run_dir, config.output.curves, f'weight pruning: {title}') as curve_writer:
    io = run_dir.io(checkpoint_every_epochs=config.output.checkpoint_every_epochs,
                    params_store=run_dir.params_store(mode, spec), log=lambda line: print(line, flush=True),
                    log_epochs=config.output.verbose, curves=curve_writer)
    records = magnitude.run(setup.model, d.image_shape, setup.trainer.replicate(DeviceData.from_dataset(d)),
                            list(range(config.seeds)), config.magnitude, setup.trainer, io=io,
                            start_theta=setup.start_theta)
    table = magnitude.sparsity_table(records, sorted(config.magnitude.sparsities), config.magnitude.methods)
    saved = saved_table(run_dir.path)
    if saved:
      table += '\n\nsaved networks (params/: dense θ with pruned weights 0 + mask; sparse form .sparse.npz)\n' + saved
    run_dir.write_text('table.md', table + '\n')
    dropnet_records = (reporting.read_jsonl(os.path.join(config.dropnet_run, 'results.jsonl'))
                       if config.dropnet_run else [])
    reporting.save_figure(magnitude.figure_records(records, dropnet_records), run_dir.file('test_accuracy_vs_weights.png'),
                          ('test_accuracy',), title=f'weight pruning: {title} ({config.magnitude.criterion})',
                          xlabel='fraction of weights remaining')
  return records, table


def saved_table(run: str) -> str:
  """The run's saved networks: selector, sparsity, non-zero params and bytes on disk of the dense
  checkpoint and the sparse form ('' when nothing was saved)."""
  rows = []
  for selector in saved_params.saved_selectors(run):
    sizes = sparse_params.read_sizes(os.path.join(run, 'params', selector))
    if sizes:
      sparsity = 1 - sizes['prunable_kept'] / sizes['prunable_params']
      rows.append(f'| {selector} | {sparsity:.4f} | {sizes["nonzero_params"]:,} / {sizes["params"]:,} | '
                  f'{sizes.get("raw_bytes", 0):,} | {sizes["dense_bytes"]:,} | {sizes["sparse_bytes"]:,} |')
  if not rows:
    return ''
  return '\n'.join(['| saved network | sparsity of prunable weights | non-zero / all params | raw bytes | '
                    'dense checkpoint bytes | sparse .npz bytes |', '| --- | --- | --- | --- | --- | --- |', *rows])
