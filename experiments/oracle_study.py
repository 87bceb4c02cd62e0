r"""The oracle baseline: greedy removal by training loss, next to DropNet's metrics.

  python -m experiments.oracle_study --dataset=mnist --data_dir=../shared/data/mnist_subset \
      --seeds=3 --oracle_examples=5000 --out=runs/oracle

Runs DropNet with metrics oracle,min,max,random_layer (resumable), then for
every metric, seed and cycle the similarity of its mask to the oracle's mask
at the same cycle (fraction of the oracle's kept units it also keeps).
Writes results.jsonl, similarity.jsonl, the accuracy figures and
similarity.png.
"""

import os
import sys

from absl import app, flags

from dropnet_jax.runs import reporting
from dropnet_jax.pruning.masks import masks_from_strings
from dropnet_jax.pruning.oracle import mask_similarity
from experiments import common

ORACLE = 'oracle'

flags.DEFINE_integer('oracle_examples', None, 'Training examples in the oracle\'s loss (default: all).')
flags.FLAGS.set_default('metrics', [ORACLE, 'min', 'max', 'random_layer'])


def similarity_records(records):
  """One record per non-oracle (seed, metric, cycle) with `oracle_similarity`."""
  oracle_masks = {(r['seed'], r['cycle']): r['mask'] for r in records if r['metric'] == ORACLE}
  out = []
  for r in records:
    ref = oracle_masks.get((r['seed'], r['cycle']))
    if r['metric'] == ORACLE or ref is None:
      continue
    out.append({'seed': r['seed'], 'metric': r['metric'], 'cycle': r['cycle'],
                'fraction_remaining': r['fraction_remaining'],
                'oracle_similarity': mask_similarity(masks_from_strings(r['mask']), masks_from_strings(ref))})
  return out


def main(argv):
  del argv
  try:
    setup = common.setup_from_flags(oracle_examples=flags.FLAGS.oracle_examples)
    if ORACLE not in setup.config.metrics:
      raise ValueError('--metrics must include oracle for this study')
    setup.settings['oracle_examples'] = flags.FLAGS.oracle_examples
    common.check_out_dir(common.FLAGS.out, setup.settings)
  except ValueError as e:
    sys.exit(f'error: {e}')
  records = common.run_dropnet(common.FLAGS.out, setup)
  similarity = similarity_records(records)
  reporting.write_jsonl(os.path.join(common.FLAGS.out, 'similarity.jsonl'), similarity)
  reporting.save_figure(similarity, os.path.join(common.FLAGS.out, 'similarity.png'), ('oracle_similarity',),
                        title=f'similarity to the oracle: {common.default_title(setup)}')
  print(reporting.summary_table(records, 'test_accuracy'))
  print(reporting.summary_table(similarity, 'oracle_similarity'))


def run() -> None:
  """The `dropnet-oracle` console command (pyproject.toml [project.scripts])."""
  app.run(main)


if __name__ == '__main__':
  run()
