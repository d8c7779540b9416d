"""Run `medtee` as a user does, except that the process SIGKILLs itself right after its first encrypted checkpoint
is on disk: a deterministic stand-in for a machine lost mid-run (nothing in medtee knows about this). With
KILL_SIGNAL=TERM it sends itself SIGTERM instead, as a scheduler preempting the job does.

usage: [KILL_SIGNAL=TERM] python killed_after_first_checkpoint.py medtee-arguments...
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
    if not getattr(_save_then_die, "sent", False):
        _save_then_die.sent = True
        os.kill(os.getpid(), getattr(signal, "SIG" + os.environ.get("KILL_SIGNAL", "KILL")))


EncryptedCheckpointIO.save_checkpoint = _save_then_die
sys.exit(main(sys.argv[1:]))
