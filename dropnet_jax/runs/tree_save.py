"""One orbax write of a pytree (saved params, a compact export), finished before the call returns.

Why one function: three places wrote a checkpoint of θ with `ocp.StandardCheckpointer().save(...)`
and each failed its own way: on Ctrl-C or SIGTERM the write was left to orbax's background threads,
which then failed at interpreter shutdown ("cannot schedule new futures after shutdown", or a C++
abort); on a full disk orbax's threads printed pages of tracebacks before the error came back.
`save_tree` does what `runs.checkpoint.Checkpointer` does for its saves:

  * Ctrl-C and SIGTERM are held back for the whole write and re-delivered after it
    (`checkpoint.signals_deferred`), so a write is never in flight when the program exits: the
    interrupt lands once the checkpoint is whole (a params tree is small: 0.1 s for Model A);
  * orbax's error logs and stray thread exceptions are silent while it writes
    (`checkpoint._quiet_orbax`, the same switch the Checkpointer holds while open), and a failure
    comes back as one exception naming the path: `OSError` with the system's errno when the
    operating system gave one (a full disk: the entry points' last resort prints it in one line),
    else `CheckpointError`; what the failed write left (`<path>.orbax-checkpoint-tmp`) is removed;
  * a `<path>.orbax-checkpoint-tmp` left by a killed process is removed silently before writing
    (orbax would otherwise warn that it exists).

Several processes (`--distributed`): every process calls `save_tree` with the same tree of numpy
arrays at the same point (orbax's barriers); numpy arrays are written by the primary process alone,
as for the Checkpointer's saves.
"""

from __future__ import annotations

import gc
import glob
import os
import re
import shutil
from typing import Any

import orbax.checkpoint as ocp

from dropnet_jax.runs.checkpoint import TMP_MARKER, CheckpointError, _quiet_orbax, _reason, signals_deferred


def remove_unfinished(path: str) -> None:
  """Removes what an unfinished orbax write of `path` left (`<path>.orbax-checkpoint-tmp*`)."""
  for tmp in glob.glob(glob.escape(path) + TMP_MARKER + '*'):
    shutil.rmtree(tmp, ignore_errors=True)


def _error(path: str, e: BaseException) -> Exception:
  """The one-line exception of a failed write of `path` (see the module docstring)."""
  found = re.search(r'os_error_code=.?(\d+)', str(e))
  code = int(found.group(1)) if found else (e.errno if isinstance(e, OSError) else None)
  if code:
    return OSError(code, os.strerror(code), path)
  return CheckpointError(f'{path}: saving failed: {_reason(e)}')


def save_tree(path: str, tree: Any) -> None:
  """Writes `tree` (arrays) as an orbax checkpoint at `path` (replacing one there); see the module docstring."""
  path = os.path.abspath(path)
  with signals_deferred(), _quiet_orbax():
    remove_unfinished(path)
    checkpointer = ocp.StandardCheckpointer()
    try:
      checkpointer.save(path, tree, force=True)
      checkpointer.wait_until_finished()
    except Exception as e:  # tensorstore / orbax errors, from the caller's thread or orbax's
      error = _error(path, e)
    else:
      error = None
    finally:
      try:
        checkpointer.close()  # joins orbax's threads, inside the quiet block
      except Exception:  # pylint: disable=broad-except
        pass  # a failure was reported above
    if error is not None:
      gc.collect()  # orbax's failed writer tasks: asyncio logs them when collected, here while that is silent
      # Orbax's threads keep some of them (and their exceptions) until exit: silent for the rest of the process,
      # which is ending with this error.
      _quiet_orbax().__enter__()
      remove_unfinished(path)
      raise error
