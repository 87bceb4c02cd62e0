"""Structured pruning at init as one library call: `StructuredRunConfig` and a directory in, records and
the report's table out.

The method is `loop.structured` (one cycle after the shared dense one: prune θ0's filters at the given
rates or to a parameter budget, train). The run directory (`RunDir`, kind 'structured') gets
config.json, results.jsonl/.csv (per seed x importance: the dense record, then the pruned network's),
table.md (importance -> params, MACs, test accuracy, dense test accuracy), the learning curves and,
with save_params, the trained params (`params/`; `experiments.compact` exports the compact network).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from dropnet_jax.config import DataConfig, ModelConfig, OutputConfig
from dropnet_jax.input_pipeline import dataset_fingerprint, input_norm_for, load_dataset
from dropnet_jax.loop import structured
from dropnet_jax.models import model_from_config
from dropnet_jax.models.compact import spec_of
from dropnet_jax.pruning import structured as structured_pruning
from dropnet_jax.runs import curves, reporting
from dropnet_jax.runs.run_dir import RunDir
from dropnet_jax.settings import setting
from dropnet_jax.training.trainer import DeviceData, Trainer, steps_per_epoch


@dataclasses.dataclass(frozen=True)
class StructuredRunConfig:
  """`experiments.structured`: filters pruned at init (per-layer rates or a budget), then trained."""
  model: ModelConfig = ModelConfig()
  data: DataConfig = DataConfig()
  seeds: int = setting(1, 'Number of seeds, run as 0..N-1.', flag='seeds')
  structured: structured.StructuredConfig = structured.StructuredConfig(rates=(0.5,))
  output: OutputConfig = OutputConfig(save_params='last')

  def validate(self) -> None:
    if self.seeds < 1:
      raise ValueError(f'seeds must be >= 1, got {self.seeds}')
    self.model.validate()
    self.structured.validate()
    self.output.validate()


@dataclasses.dataclass
class Setup:
  config: StructuredRunConfig
  model: Any
  dataset: Any
  run_dir: RunDir
  trainer: Trainer


def prepare(config: StructuredRunConfig, out: str) -> Setup:
  """Every check before any work (settings, the rates against the model, the directory), then the data."""
  config.validate()
  probe = model_from_config(config.model, 10)
  if config.structured.rates is not None:
    structured_pruning.group_rates(probe, config.structured.rates)  # one rate per block / layer: before the data
  run_dir = RunDir(out, 'structured', config)
  run_dir.check()
  d = config.data
  dataset = load_dataset(d.dataset, d.data_dir, split_seed=d.split_seed)
  run_dir.data_fingerprint = dataset_fingerprint(dataset)
  run_dir.check()
  model = model_from_config(config.model, dataset.num_classes, input_norm_for(config.data.normalize, dataset))
  structured.resolve_rates(model, dataset.image_shape, config.structured)  # a budget no width meets: before work
  train = config.structured.train
  trainer = Trainer(model, train, steps_per_epoch=steps_per_epoch(len(dataset.train_labels), train.batch_size))
  return Setup(config, model, dataset, run_dir, trainer)


def table(records: list[dict[str, Any]]) -> str:
  """Per importance: the pruned network's params and MACs, its test accuracy and the dense network's
  (mean over seeds)."""
  dense = np.mean([r['test_accuracy'] for r in records if r['cycle'] == 0])
  dense_params = next(r['params'] for r in records if r['cycle'] == 0)
  lines = ['| importance | params | MACs | test accuracy | dense test accuracy | dense params |',
           '| --- | --- | --- | --- | --- | --- |']
  for importance in dict.fromkeys(r['importance'] for r in records):
    pruned = [r for r in records if r['importance'] == importance and r['cycle'] == 1]
    if pruned:
      lines.append(f'| {importance} | {pruned[0]["params"]:,} | {pruned[0]["macs"]:,} | '
                   f'{np.mean([r["test_accuracy"] for r in pruned]):.4f} (n={len(pruned)}) | {dense:.4f} | '
                   f'{dense_params:,} |')
  return '\n'.join(lines)


def run(setup: Setup) -> tuple[list[dict[str, Any]], str]:
  """Runs (or resumes) every seed x importance into the run directory; returns (records, the table)."""
  config, run_dir, d = setup.config, setup.run_dir, setup.dataset
  spec = {**spec_of(setup.model), 'image_shape': list(d.image_shape)}
  mode = {'none': 'none', 'all': 'all'}.get(config.output.save_params, 'last')
  title = reporting.run_title(config.model.name, setup.model.widths, config.data.dataset)
  with run_dir.open(config.output.max_checkpoints), \
      curves.for_run(run_dir, config.output.curves, f'structured pruning at init: {title}') as curve_writer:
    io = run_dir.io(checkpoint_every_epochs=config.output.checkpoint_every_epochs,
                    params_store=run_dir.params_store(mode, spec), log=lambda line: print(line, flush=True),
                    log_epochs=config.output.verbose, curves=curve_writer)
    records = structured.run(setup.model, d.image_shape, setup.trainer.replicate(DeviceData.from_dataset(d)),
                             list(range(config.seeds)), config.structured, setup.trainer, io=io)
    text = table(records)
    run_dir.write_text('table.md', text + '\n')
  return records, text
