"""A DropNet run as one library call: an `ExperimentConfig` and a directory in, records out.

`prepare(config, out)` does every check before any work (the settings, the model and widths, the
run directory, the data, the device split and the optimiser's schedule) and loads the data;
`run(setup)` runs or resumes Algorithm 1 for every seed x metric into the directory (config.json,
results.jsonl/.csv, checkpoints/, params/, figures) with a progress display. The entry points
(`experiments.dropnet` and the studies) are this plus a report; a notebook can call it the same way.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

import jax
import numpy as np
from absl import logging

from dropnet_jax.config import ExperimentConfig
from dropnet_jax.input_pipeline import Dataset, dataset_fingerprint, input_norm_for, load_dataset
from dropnet_jax.loop.dropnet import run_experiment
from dropnet_jax.models import init_params, model_from_config
from dropnet_jax.models.compact import spec_of
from dropnet_jax.runs import curves, progress, reporting
from dropnet_jax.runs.run_dir import RunDir
from dropnet_jax.training import distributed as dist
from dropnet_jax.training.trainer import DeviceData, Trainer, data_mesh, steps_per_epoch


@dataclasses.dataclass
class Setup:
  """A checked DropNet run: its config, model, data and directory (nothing written yet)."""
  config: ExperimentConfig
  model: Any
  dataset: Dataset
  run_dir: RunDir
  distributed: bool = False
  start_theta: Any = None  # --init_from's network, loaded and checked against the model at prepare

  @property
  def seeds(self) -> list[int]:
    return list(range(self.config.seeds))

  @property
  def data(self) -> DeviceData:
    if not hasattr(self, '_data'):
      if self.distributed:  # every process loaded the same data: each fills its own devices' replicas
        from jax.sharding import NamedSharding, PartitionSpec
        sharding = NamedSharding(data_mesh(dist.global_devices()), PartitionSpec())  # Trainer.replicated's
        d = self.dataset
        self._data = DeviceData(*(dist.replicate_host_array(a, sharding) for a in (
            d.train_images, d.train_labels, d.val_images, d.val_labels, d.test_images, d.test_labels)))
      else:
        self._data = DeviceData.from_dataset(self.dataset)
    return self._data

  def trainer(self) -> Trainer:
    train = self.config.dropnet.train
    return Trainer(self.model, train, devices=dist.global_devices() if self.distributed else None,
                   steps_per_epoch=steps_per_epoch(len(self.dataset.train_labels), train.batch_size))

  def title(self) -> str:
    return reporting.run_title(self.config.model.name, self.model.widths, self.config.data.dataset)

  def derived(self, out: str, **dropnet_changes) -> 'Setup':
    """The same run with some DropNetConfig fields replaced, into `out` (for studies); checked."""
    config = dataclasses.replace(self.config, dropnet=dataclasses.replace(self.config.dropnet, **dropnet_changes))
    config.validate()
    return self.into(out, config)

  def into(self, out: str, config: ExperimentConfig | None = None, kind: str = 'dropnet') -> 'Setup':
    """This run (or `config` on the same model and data) into another directory; checked (the config
    too, so a study's derived run is refused before the first run trains)."""
    (config or self.config).validate()
    run_dir = RunDir(out, kind, config or self.config, data_fingerprint=self.run_dir.data_fingerprint,
                     writes=self.run_dir.writes, distributed=self.distributed)
    run_dir.check()
    return dataclasses.replace(self, config=config or self.config, run_dir=run_dir)


def build_model(config: ExperimentConfig, dataset=None):
  """The run's model: for `dataset`'s classes and, with data.normalize, its training split's channel
  statistics; without a dataset, for 10 classes (to check the model settings before any data is read)."""
  if dataset is None:
    return model_from_config(config.model, 10)
  return model_from_config(config.model, dataset.num_classes, input_norm_for(config.data.normalize, dataset))


def prepare(config: ExperimentConfig, out: str, kind: str = 'dropnet', *, distributed: bool = False,
            inputs: tuple[str, ...] = ()) -> Setup:
  """Checks everything, then loads the data; raises ValueError (input_pipeline.DataError) naming the
  problem, before anything is written."""
  config.validate()
  build_model(config)  # validates the model name and widths before any data is read
  run_dir = RunDir(out, kind, config, inputs=(*inputs, *start_inputs(config.start.init_from)),
                   writes=dist.is_main(), distributed=distributed)
  run_dir.check()
  data = config.data
  dataset = load_dataset(data.dataset, data.data_dir, split_seed=data.split_seed)
  run_dir.data_fingerprint = dataset_fingerprint(dataset)  # what the data are, wherever they were read from
  run_dir.check()
  setup = Setup(config, build_model(config, dataset), dataset, run_dir, distributed)
  setup.start_theta = load_start(config.start.init_from, setup.model, dataset.image_shape)
  setup.trainer()  # the device split and the optimiser's schedule are checked here
  logging.info('%s: train %d, val %d, test %d, image %s', data.dataset, len(dataset.train_labels),
               len(dataset.val_labels), len(dataset.test_labels), dataset.image_shape)
  return setup


def start_inputs(init_from: str | None) -> tuple[str, ...]:
  """The directory --init_from reads (a run or an export): the run may not write into it."""
  if not init_from:
    return ()
  from dropnet_jax.runs import init_from as init_from_lib
  source = init_from_lib.parse(init_from)
  return () if source.kind == 'torch' else (source.path,)


def load_start(init_from: str | None, model, image_shape) -> Any:
  """--init_from's θ for `model` (None without it); ValueError in one line when it does not fit."""
  if not init_from:
    return None
  from dropnet_jax.runs import init_from as init_from_lib
  theta, info = init_from_lib.load(init_from, model, image_shape)
  logging.info('init_from %s (%s): the dense cycle is this network, evaluated', info['init_from'], info['kind'])
  return theta


def params_spec(setup: Setup) -> dict[str, Any]:
  """What params/spec.json holds: the model's spec and the image shape (enough to rebuild it)."""
  return {**spec_of(setup.model), 'image_shape': list(setup.dataset.image_shape)}


def save_params_mode(setup: Setup) -> str:
  """save_params with auto resolved: every cycle for small models, the last per trial otherwise."""
  mode = setup.config.output.save_params
  if mode != 'auto':
    return mode
  shapes = jax.eval_shape(lambda: init_params(setup.model, jax.random.key(0), setup.dataset.image_shape))
  count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
  return 'all' if count < 1_000_000 else 'last'


class _Silent:
  """A stream that drops what is written: the progress output of a process that does not write."""

  def write(self, text: str) -> int:
    return len(text)

  def flush(self) -> None:
    pass

  def isatty(self) -> bool:
    return False


def run(setup: Setup, title: str = '') -> list[dict[str, Any]]:
  """Runs (or resumes) DropNet into the setup's directory; returns all records.

  Shows a progress bar on a terminal (elsewhere one line per cycle; per epoch too with verbose); a
  process that does not write (a --distributed run's processes other than 0) shows nothing.
  """
  config, run_dir = setup.config, setup.run_dir
  run_dir.check()
  trainer = setup.trainer()
  mode = save_params_mode(setup)
  spec = params_spec(setup)
  start = time.perf_counter()
  data = trainer.replicate(setup.data) if config.batch_trials else setup.data
  trials = len(setup.seeds) * len(config.dropnet.metrics)
  cycles = progress.expected_cycles(list(setup.model.widths), config.dropnet.fraction, config.dropnet.floor)
  title = title or setup.title()
  # A --distributed run's processes other than 0 (they do not write) print nothing: process 0's lines
  # are the run's.
  display = progress.ProgressMonitor(trials, cycles, stream=None if run_dir.writes else _Silent())
  with run_dir.open(config.output.max_checkpoints), display as monitor, \
      curves.for_run(run_dir, config.output.curves, title) as curve_writer:
    d = setup.dataset
    monitor.log(f'{title}: {trials} trial{"s" * (trials != 1)} (seeds x metrics), up to {cycles} cycles each; '
                f'train {len(d.train_labels)}, val {len(d.val_labels)}, test {len(d.test_labels)} images '
                f'-> {run_dir.path}')
    io = run_dir.io(checkpoint_every_epochs=config.output.checkpoint_every_epochs,
                    params_store=run_dir.params_store(mode, spec), log=monitor.log,
                    log_epochs=config.output.verbose, monitor=monitor, curves=curve_writer)
    records = run_experiment(setup.model, d.image_shape, data, setup.seeds, config.dropnet, trainer, io=io,
                             batch_trials=config.batch_trials, lane_schedule=config.lane_schedule,
                             lanes=config.lanes, start_theta=setup.start_theta)
  logging.info('%s: %d records, %.1fs in this invocation', run_dir.path, len(records), time.perf_counter() - start)
  if run_dir.writes:
    reporting.save_figures(records, run_dir.path, title=title, x_axis=config.output.x_axis)
  return records


def run_side_by_side(study: RunDir, runs: dict[str, Setup], label: Callable[[str, str], str],
                     title: str) -> list[dict[str, Any]]:
  """Runs (or resumes) each setup (each in its own directory below the study's), then writes the
  combined records (metric relabelled `label(metric, name)`), results.jsonl/.csv and figures into the
  study's directory: for the studies. Returns the combined records."""
  combined = []
  with study.open():
    for name, setup in runs.items():
      records = run(setup)
      combined += [{**r, 'metric': label(r['metric'], name)} for r in records]
    study.write_results(combined)
    if study.writes:
      reporting.save_figures(combined, study.path, title=title)
  return combined


def random_init_baseline(setup: Setup, records: list[dict[str, Any]], done: list[dict[str, Any]],
                         on_record: Callable[[list[dict[str, Any]]], None],
                         params_store: Any = None) -> list[dict[str, Any]]:
  """Every record's mask retrained from a fresh random init (`loop.dropnet.retrain_from_random_init`),
  after the `done` ones of an earlier invocation; `on_record` gets all of them after each one, and
  `params_store` (`saved_params.ParamsStore`) each trained θ (as metric '<metric>_randominit')."""
  from dropnet_jax.loop.dropnet import retrain_from_random_init
  from dropnet_jax.loop.state import Trial
  reinit = list(done)
  finished = {(r['seed'], r['metric'], r['cycle']) for r in reinit}
  trainer = Trainer(setup.model, setup.config.dropnet.train)
  for record in records:
    if (record['seed'], f'{record["metric"]}_randominit', record['cycle']) in finished:
      continue  # resumed: already retrained
    new, theta = retrain_from_random_init(trainer, setup.model, setup.dataset.image_shape, setup.data, record,
                                          setup.config.dropnet, with_theta=True)
    reinit.append(new)
    if params_store is not None:
      params_store.saved_cycle(Trial(new['seed'], new['metric'], None, new['cycle'], records=[new]), theta)
    on_record(reinit)
    r = reinit[-1]
    logging.info('randominit seed %d %s cycle %d fraction %.3f test_acc %.4f (θ0: %.4f)', r['seed'], r['metric'],
                 r['cycle'], r['fraction_remaining'], r['test_accuracy'], record['test_accuracy'])
  return reinit


def run_config(config: ExperimentConfig, out: str) -> list[dict[str, Any]]:
  """`prepare` and `run` in one call (the public `dropnet_jax.run`): DropNet for every seed x metric
  of `config` into the run directory `out` (resumed when it holds the same run)."""
  return run(prepare(config, out))


def load_config(run_dir: str, default: Any = None) -> Any:
  """A run's configuration from its config.json (`default`: the config class's defaults, for runs
  of other kinds), e.g. to rerun it or vary one setting with `dataclasses.replace`."""
  import json
  import os
  from dropnet_jax import settings
  with open(os.path.join(run_dir, 'config.json')) as f:
    data = json.load(f)
  return settings.from_dict(default if default is not None else ExperimentConfig(), data['config'])
