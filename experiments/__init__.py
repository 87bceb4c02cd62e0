"""Thin absl entry points over dropnet_jax (run as `python -m experiments.<name>`): each is a config
(dropnet_jax.config), one library call and a report.

Importing `dropnet_jax.cli` first applies `--host_devices` before anything imports jax.
"""

import dropnet_jax.cli  # noqa: F401
