"""The PyTorch DropNet a researcher would write, for side-by-side checks with dropnet_jax.

`models` (masked Model A/B/C and VGG16/19 as torch.nn modules), `weights` (Flax <-> torch
parameter transfer), `train` (SGD with early stopping, explicit batch orders)
and `dropnet` (Algorithm 1). `tests/torch_parity_test.py` checks that it
computes what dropnet_jax computes; `experiments/compare.py` times both.
"""
