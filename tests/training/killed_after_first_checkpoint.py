"""Run `medtee` as a user does, except that the process SIGKILLs itself right after its first encrypted checkpoint
is on disk: a deterministic stand-in for a machine lost mid-run (nothing in medtee knows about this).

usage: python killed_after_first_checkpoint.py medtee-arguments...
"""

from __future__ import annotations

import os
import signal
import sys

from medtee.cli import main
from medtee.training.checkpoint import EncryptedCheckpointIO

_save = EncryptedCheckpointIO.save_checkpoint


def _save_then_die(self, checkpoint, path, storage_options=None) -> None:
    _save(self, checkpoint, path, storage_options)
    os.kill(os.getpid(), signal.SIGKILL)


EncryptedCheckpointIO.save_checkpoint = _save_then_die
sys.exit(main(sys.argv[1:]))
