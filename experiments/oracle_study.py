r"""The oracle baseline: greedy removal by training loss, next to DropNet's metrics.

  python -m experiments.oracle_study --dataset=mnist --data_dir=../shared/data/mnist_subset \
      --seeds=3 --oracle_examples=5000 --out=runs/oracle

Runs DropNet with metrics oracle,min,max,random_layer (resumable), then for
every metric, seed and cycle the similarity of its mask to the oracle's mask
at the same cycle (fraction of the oracle's kept units it also keeps).
Writes results.jsonl, similarity.jsonl, the accuracy figures and
similarity.png.
"""

from dropnet_jax.cli import entry
from dropnet_jax.config import DropNetConfig, ExperimentConfig
from dropnet_jax.pruning.oracle import ORACLE, similarity_records

CONFIG = entry.define(ExperimentConfig(dropnet=DropNetConfig(metrics=(ORACLE, 'min', 'max', 'random_layer'))),
                      'dropnet')


def main(argv):
  from dropnet_jax.runs import experiment, reporting  # here: --help needs neither
  del argv
  try:
    config = entry.config(CONFIG)
    if ORACLE not in config.dropnet.metrics:
      raise ValueError('--metrics must include oracle for this study')
    setup = experiment.prepare(config, entry.FLAGS.out)
  except ValueError as e:
    entry.fail(e)
  records = experiment.run(setup)
  similarity = similarity_records(records)
  run_dir = setup.run_dir
  reporting.write_jsonl(run_dir.file('similarity.jsonl'), similarity)
  reporting.save_figure(similarity, run_dir.file('similarity.png'), ('oracle_similarity',),
                        title=f'similarity to the oracle: {setup.title()}')
  print(reporting.summary_table(records, 'test_accuracy'))
  print(reporting.summary_table(similarity, 'oracle_similarity'))


def run() -> None:
  """The `dropnet-oracle` console command."""
  entry.run(main)


if __name__ == '__main__':
  run()
