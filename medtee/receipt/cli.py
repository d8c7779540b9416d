"""`medtee receipt verify`: check a training receipt offline (exit 0 verified, 1 rejected, 2 unusable input)."""

from __future__ import annotations

import argparse
from pathlib import Path

MAX_RECEIPT_BYTES = 64 << 20


def add_parser(subparsers) -> None:
    """Register `receipt verify` on an argparse subparsers object."""
    receipt = subparsers.add_parser("receipt", help="verify a run's signed training receipt")
    sub = receipt.add_subparsers(dest="receipt_command", metavar="ACTION", required=True)
    verify = sub.add_parser("verify", help="verify receipt.dsse.json and the files it names, offline",
                            description="Checks the DSSE signature, that the receipt key is bound into the "
                                        "attestation evidence, the evidence under a policy, each --adapter "
                                        "file against the receipt's subjects and the --dataset against its "
                                        "manifest. Exit 0 when every check passes, 1 "
                                        "when the receipt is rejected (each failed check named), 2 on unusable "
                                        "input.")
    verify.add_argument("receipt", metavar="RECEIPT", help="receipt.dsse.json from a run's output directory")
    verify.add_argument("--adapter", metavar="FILE", action="append", default=[],
                        help="an output file (e.g. adapter.safetensors.enc) to check against the subjects; repeatable")
    verify.add_argument("--dataset", metavar="DIR",
                        help="a sealed dataset directory whose manifest must be the one the receipt names")
    verify.add_argument("--broker-log", metavar="FILE",
                        help="the key broker's audit.log (from the data owner): its release and close entries must "
                             "record what the receipt says")
    verify.add_argument("--broker-head", metavar="HASH",
                        help="with --broker-log: the log's head as the data owner anchored it outside the log (printed "
                             "by `medtee broker audit verify` after the run's close); the log must hold that entry, "
                             "and the release and close must come at or before it")
    verify.add_argument("--policy", metavar="NAME|FILE",
                        help="appraise under this policy (a name in conf/attestation/, or a YAML file) instead of "
                             "the one recorded in the receipt; trust a receipt only under your own policy")
    verify.add_argument("--at", metavar="ISO-TIME", help="verify certificates as of this time (default: now; naive = UTC)")
    verify.add_argument("--json", action="store_true", help="print the result as JSON")
    verify.set_defaults(handler=run_verify)


def _at(value: str | None):
    from datetime import datetime, timezone

    if value is None:
        return None
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"--at '{value}' is not an ISO 8601 time (e.g. 2025-06-01T00:00:00Z)") from None
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


def _shown(text: str) -> str:
    """`text` with what a terminal would act on escaped (ESC and other controls, lone surrogates, bidi overrides):
    reasons quote the receipt (subject names, certificate names), which must not rewrite or crash the output."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def run_verify(args: argparse.Namespace) -> int:
    """Handler of `medtee receipt verify`."""
    import json

    from medtee import exits
    from medtee.attestation.policy import resolve_policy
    from medtee.files import NotRegularFile, read_regular
    from medtee.receipt.verify import UnusableInput, verify_receipt

    try:
        now = _at(args.at)
        policy = resolve_policy(args.policy) if args.policy else None
        data = read_regular(args.receipt, MAX_RECEIPT_BYTES)
        result = verify_receipt(data, files=args.adapter, policy=policy, now=now, dataset=args.dataset,
                                broker_log=args.broker_log, broker_head=args.broker_head)
    except (NotRegularFile, OSError) as exc:
        inside = Path(args.receipt) / "receipt.dsse.json"
        hint = f"; a run's receipt is its {inside}" if Path(args.receipt).is_dir() and inside.is_file() else ""
        return exits.fail(_shown(f"receipt verify: {args.receipt}: {getattr(exc, 'strerror', None) or exc}{hint}"))
    except (UnusableInput, ValueError) as exc:
        return exits.fail(_shown(f"receipt verify: unusable input: {exc}"))
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
    else:
        head = "VERIFIED" if result.ok else "REJECTED"
        simulated = " (SIMULATED)" if result.simulated else ""
        print(_shown(f"{head}: {args.receipt} under policy '{result.policy}'{simulated}"))
        says = result.claims
        error = f" ({says['error_type']})" if says["error_type"] else ""
        print(_shown(f"  the receipt says: run {says['outcome']}{error} on dataset '{says['dataset_id']}' (manifest "
                     f"{says['manifest_digest'][:16]}...), recipe {says['recipe_digest'][:16]}..., release "
                     f"{says['release_id'][:16]}..."))
        for c in result.checks:
            print(_shown(f"  {'ok  ' if c.ok else 'FAIL'} {c.name}: {c.reason}"))
    return exits.OK if result.ok else exits.fail(
        _shown(f"receipt rejected: {', '.join(c.name for c in result.failures())}"), exits.REFUSED)
