"""Orbax checkpoints of a running experiment: arrays plus a JSON position.

A checkpoint has two items: `arrays` (a pytree of arrays: θ0, the current
masks, a mid-cycle training state, the dense cycle's stat sums) and `meta` (a
JSON object: where the experiment stands and the records so far). The JSON is
read first because it says which arrays exist, and so which restore template
to build.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """Numbered checkpoints in `directory`, keeping the newest `max_to_keep`."""

  def __init__(self, directory: str, max_to_keep: int = 3):
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True,
        # Synchronous: a checkpoint is complete on disk when save() returns, so a
        # SIGKILL right after cannot leave the newest checkpoint half-written.
        enable_async_checkpointing=False)
    self.manager = ocp.CheckpointManager(os.path.abspath(directory), options=options,
                                         item_names=('arrays', 'meta'))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, arrays: dict[str, Any], meta: dict[str, Any]) -> int:
    step = (self.latest_step() or 0) + 1
    self.manager.save(step, args=ocp.args.Composite(arrays=ocp.args.StandardSave(arrays),
                                                    meta=ocp.args.JsonSave(meta)))
    self.manager.wait_until_finished()
    return step

  def restore_meta(self, step: int | None = None) -> dict[str, Any] | None:
    step = self.latest_step() if step is None else step
    if step is None:
      return None
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']

  def restore_arrays(self, template: dict[str, Any], step: int | None = None) -> dict[str, Any]:
    step = self.latest_step() if step is None else step
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
    return self.manager.restore(step, args=ocp.args.Composite(arrays=ocp.args.StandardRestore(abstract)))['arrays']

  def close(self) -> None:
    self.manager.close()
