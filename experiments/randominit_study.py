r"""Random re-initialisation baseline: each cycle's DropNet mask retrained from a fresh init.

  python -m experiments.randominit_study --dataset=mnist --data_dir=../shared/data/mnist_subset \
      --metrics=min --seeds=3 --out=runs/randominit

Runs DropNet into <out>/theta0 (resumable), then retrains every recorded mask
from a fresh random initialisation (same mask and batch order; only the init
differs) into <out>/randominit.jsonl (resumable too; also <out>/results.jsonl/.csv, whose networks
--save_params keeps in <out>/params as '<metric>_randominit', readable by `saved_params.load_saved`),
and plots both side by side.
"""

import os

from dropnet_jax.cli import entry
from dropnet_jax.config import ExperimentConfig

CONFIG = entry.define(ExperimentConfig(), 'randominit_study')


def main(argv):
  from dropnet_jax.runs import experiment, reporting  # here: --help needs neither
  del argv
  out = entry.FLAGS.out
  try:
    config = entry.config(CONFIG)
    setup = experiment.prepare(config, os.path.join(out, 'theta0'))
    study = experiment.RunDir(out, 'randominit_study', config, data_fingerprint=setup.run_dir.data_fingerprint)
    study.check()
  except ValueError as e:
    entry.fail(e)
  with study.open():
    theta0 = experiment.run(setup)
    path = study.file('randominit.jsonl')
    params = study.params_store(experiment.save_params_mode(setup), experiment.params_spec(setup))

    def on_record(records):
      reporting.write_jsonl(path, records)
      study.write_results(records)  # results.jsonl beside params/: the saved networks' records

    reinit = experiment.random_init_baseline(setup, theta0, reporting.read_jsonl(path) if os.path.exists(path) else [],
                                             on_record=on_record, params_store=params)
  both = theta0 + reinit
  reporting.save_figures(both, out, title=f'θ0 vs random re-init: {setup.title()}')
  print(reporting.summary_table(both, 'test_accuracy'))


def run() -> None:
  """The `dropnet-randominit` console command."""
  entry.run(main)


if __name__ == '__main__':
  run()
