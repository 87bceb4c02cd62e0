"""Model A on MNIST with every cycle's trained params saved: the source of the compaction and
ensemble examples (`experiments.compact --run=...`, `experiments.ensemble --run=...`).

  python -m experiments.dropnet --config=configs/fc40_mnist_saved.py --out=runs/compact_src
  python -m experiments.dropnet --config=configs/fc40_mnist_saved.py --metrics=min,max,random,min_layer,max_layer,random_layer \
      --seeds=2 --batch_trials --out=runs/ens_src
"""

from dropnet_jax.config import DataConfig, DropNetConfig, ExperimentConfig, ModelConfig, OutputConfig


def get_config() -> ExperimentConfig:
  return ExperimentConfig(model=ModelConfig(name='fc', widths=(40, 40)),
                          data=DataConfig(dataset='mnist', data_dir='../shared/data/mnist_subset'),
                          dropnet=DropNetConfig(metrics=('min',)), output=OutputConfig(save_params='all'))
