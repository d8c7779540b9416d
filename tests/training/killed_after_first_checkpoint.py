"""Run `medtee` as a user does, except that the process SIGKILLs itself right after its first encrypted checkpoint
is on disk: a deterministic stand-in for a machine lost mid-run (nothing in medtee knows about this). With
KILL_SIGNAL=TERM it sends itself SIGTERM instead, as a scheduler preempting the job does; with KILL_AT_STEP=N it
does so at the end of training step N instead.

usage: [KILL_SIGNAL=TERM] [KILL_AT_STEP=N] python killed_after_first_checkpoint.py medtee-arguments...
"""

from __future__ import annotations

import os
import signal
import sys

from medtee.cli import main
from medtee.training.checkpoint import EncryptedCheckpointIO
from medtee.training.module import CausalLMModule

SIGNAL = getattr(signal, "SIG" + os.environ.get("KILL_SIGNAL", "KILL"))
AT_STEP = int(os.environ.get("KILL_AT_STEP", "0"))
_save, _batch_end = EncryptedCheckpointIO.save_checkpoint, CausalLMModule.on_train_batch_end
_sent = []


def _signal_once() -> None:
    if not _sent:
        _sent.append(True)
        os.kill(os.getpid(), SIGNAL)


def _save_then_die(self, checkpoint, path, storage_options=None) -> None:
    _save(self, checkpoint, path, storage_options)
    if not AT_STEP:
        _signal_once()


def _batch_end_then_die(self, outputs, batch, batch_idx) -> None:
    _batch_end(self, outputs, batch, batch_idx)
    if AT_STEP and self.trainer.global_step == AT_STEP:
        _signal_once()


EncryptedCheckpointIO.save_checkpoint, CausalLMModule.on_train_batch_end = _save_then_die, _batch_end_then_die
sys.exit(main(sys.argv[1:]))
