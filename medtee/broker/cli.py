"""`medtee broker serve|audit|policy`: the data owner's key broker service, its audit log, release policies.

Handlers return 0 (ok), 1 (refused) or 2 (bad input, with a message naming the file or field and the fix).
Nothing here prints record content.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from medtee import exits
from medtee.broker.protocol import DEFAULT_BROKER_DIR




def _positive(kind: type):
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive (got {text})")
        return value

    return parse


def _serve(args: argparse.Namespace) -> int:
    from medtee.broker.server import Limits, serve

    limits = Limits(max_connections=args.max_connections, idle_timeout_s=args.idle_timeout,
                    body_timeout_s=args.body_timeout)
    try:
        serve(args.store, host=args.host, port=args.port, tls_cert=args.tls_cert, tls_key=args.tls_key, limits=limits,
              nonce_ttl_s=args.nonce_ttl, max_challenges_per_dataset=args.max_challenges_per_dataset,
              max_challenges_per_client=args.max_challenges_per_client,
              announce=lambda url: print(f"medtee key broker listening on {url}", flush=True))
    except (OSError, ValueError) as e:
        return exits.fail(f"cannot serve on {args.host}:{args.port}: {e}")
    return exits.OK


def _audit_verify(args: argparse.Namespace) -> int:
    from medtee.broker.audit import verify

    report = verify(Path(args.store) / "audit.log")
    if not report.ok:
        return exits.fail(f"audit log FAILED verification after {report.entries} good entries: {report.problem}",
                          exits.REFUSED)
    print(f"audit log OK: {report.entries} entries, head {report.head}")
    print("anchor the head elsewhere to detect later truncation")
    return exits.OK


def _policy(args: argparse.Namespace) -> int:
    from medtee.broker.protocol import UnknownDatasetError
    from medtee.broker.service import EmbeddedBroker

    try:
        EmbeddedBroker(args.store).set_policy(args.dataset_id, args.policy)
    except (UnknownDatasetError, ValueError) as e:
        return exits.fail(str(e))
    print(f"dataset {args.dataset_id}: release policy is now '{args.policy}' (effective at the next release)")
    return exits.OK


def _broker_dir_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--broker-dir", "--store", dest="store", default=DEFAULT_BROKER_DIR, metavar="DIR",
                        help=f"the broker's store directory (default {DEFAULT_BROKER_DIR}; --store is the old name)")


def add_parser(subparsers) -> None:
    """Register `broker serve|audit|policy` on the `medtee` subparsers."""
    broker = subparsers.add_parser("broker", help="run the key broker service; audit; release policies")
    broker_sub = broker.add_subparsers(dest="broker_command", metavar="ACTION", required=True)
    srv = broker_sub.add_parser("serve", help="serve challenge/attest/release over HTTP (loopback by default)")
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    srv.add_argument("--port", type=int, default=8765, help="port (default 8765; 0 picks a free one)")
    _broker_dir_argument(srv)
    srv.add_argument("--tls-cert", default=None, help="PEM certificate chain: serve https")
    srv.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")
    for flag, kind, default, text in (
            ("--nonce-ttl", float, 120.0, "seconds a challenge nonce stays valid"),
            ("--max-challenges-per-dataset", int, 1024, "outstanding challenges per dataset; more get 429"),
            ("--max-challenges-per-client", int, 256, "outstanding challenges per client address; more get 429"),
            ("--max-connections", int, 256, "open connections; a request beyond gets 503"),
            ("--idle-timeout", float, 5.0, "seconds a connection may take to send a request's headers"),
            ("--body-timeout", float, 10.0, "seconds a request may take to send its body")):
        srv.add_argument(flag, type=_positive(kind), default=default, help=f"{text} (default {default:g})")
    srv.set_defaults(handler=_serve)
    aud = broker_sub.add_parser("audit", help="check the broker's hash-chained audit log")
    aud.add_argument("action", choices=["verify"])
    _broker_dir_argument(aud)
    aud.set_defaults(handler=_audit_verify)
    pol = broker_sub.add_parser("policy", help="set a dataset's release policy (takes effect without restart)")
    pol.add_argument("dataset_id")
    pol.add_argument("policy", help="attestation policy name (conf/attestation/NAME.yaml)")
    _broker_dir_argument(pol)
    pol.set_defaults(handler=_policy)
