"""Run `medtee` the way a user does, with two test-side additions (nothing in medtee knows about them):

- an audit hook that appends every outgoing network connection (event and address, never data) to AUDIT_FILE;
- with MEDTEE_TEST_FAIL_AT_STEP=k, a fault: at training step k, CausalLMModule.training_step logs the batch (its
  token ids and its decoded text), warns quoting the text, and raises an exception quoting it, logged with its
  traceback: what careless code would do.

usage: python harness.py AUDIT_FILE medtee-arguments...
"""

from __future__ import annotations

import json
import os
import sys


def _audit(path: str):
    def hook(event: str, args) -> None:
        if event == "socket.connect":
            address = args[1]
        elif event == "socket.getaddrinfo":
            address = (args[0], args[1])
        else:
            return
        with open(path, "a") as f:
            f.write(json.dumps([event, repr(address)]) + "\n")

    return hook


def _inject_fault(at_step: int) -> None:
    import logging
    import warnings

    from medtee.training import module

    original = module.CausalLMModule.training_step

    def training_step(self, batch, batch_idx):
        if batch_idx >= at_step:
            from medtee.data.tokenizer import build_demo_tokenizer

            text = " ".join(build_demo_tokenizer().batch_decode(batch["input_ids"]))
            logging.getLogger("lightning.pytorch").warning("bad batch %s decoded as %s", batch["input_ids"], text)
            warnings.warn(f"suspicious sample {text!r}")
            try:
                raise ValueError(f"cannot train on {text!r}")
            except ValueError:
                logging.getLogger("medtee.test").exception("step %d failed", batch_idx)
                raise
        return original(self, batch, batch_idx)

    module.CausalLMModule.training_step = training_step


def main() -> int:
    audit_file, argv = sys.argv[1], sys.argv[2:]
    sys.addaudithook(_audit(audit_file))
    if os.environ.get("MEDTEE_TEST_FAIL_AT_STEP"):
        _inject_fault(int(os.environ["MEDTEE_TEST_FAIL_AT_STEP"]))
    from medtee.cli import main as medtee

    return medtee(argv)


if __name__ == "__main__":
    sys.exit(main())
