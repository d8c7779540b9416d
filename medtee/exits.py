"""Exit codes of every medtee command, and the one way a command reports a refusal or bad input.

0 success; 1 refused (the environment, the attestation or the key broker says no); 2 bad configuration or input
(the message names the key, file or field and the fix); 3 the run failed while training (reported by exception type
and place, never the message: it could quote data); 130 interrupted (Ctrl-C), 143 terminated (SIGTERM), after the
run's end (teardown, release closed, receipt).
"""

from __future__ import annotations

import sys

OK, REFUSED, BAD_INPUT, FAILED, INTERRUPTED = 0, 1, 2, 3, 130


def say(message: str) -> None:
    """Print `medtee: MESSAGE` on stderr (never data: messages name keys, files, positions and digests)."""
    print(f"medtee: {message}", file=sys.stderr, flush=True)


def fail(message: str, code: int = BAD_INPUT) -> int:
    """`say(message)` and return `code`."""
    say(message)
    return code
