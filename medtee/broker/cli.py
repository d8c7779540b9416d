"""`medtee broker serve|audit|policy`: the data owner's key broker service, its audit log, release policies.

Handlers return 0 (ok), 1 (refused) or 2 (bad input, with a message naming the file or field and the fix).
Nothing here prints record content.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from pathlib import Path

from medtee import exits
from medtee.broker.protocol import DEFAULT_BROKER_DIR, DEFAULT_NONCE_TTL_S
from medtee.broker.service import BROKER_KEY_NAME, DEFAULT_MAX_CHALLENGES_PER_CLIENT, DEFAULT_MAX_CHALLENGES_PER_DATASET


class _ServerDefault:
    """A `broker serve` default kept in medtee.broker.server (DEFAULT_PORT or a `Limits` field), read only when
    shown or used: importing the server loads uvicorn and Starlette, which `medtee --help` should not pay for."""

    def __init__(self, name: str) -> None:
        self.name = name

    def value(self):
        from medtee.broker import server

        return getattr(server.Limits if self.name in server.Limits.__dataclass_fields__ else server, self.name)

    def __str__(self) -> str:
        return f"{self.value():g}"


def _given(value):
    """An option's value: what was given, else its default."""
    return value.value() if isinstance(value, _ServerDefault) else value


def _positive(kind: type):
    def parse(text: str):
        value = kind(text)
        if not (math.isfinite(value) and value > 0):  # NaN passes every comparison; inf never expires
            raise argparse.ArgumentTypeError(f"must be a positive finite number (got {text})")
        return value

    return parse


MAX_PORT = 65535
MAX_TLS_FILE_BYTES = 1 << 20  # a PEM chain or key is a few KB


def _tls_problem(cert: str | None, key: str | None) -> str | None:
    """Why `--tls-cert`/`--tls-key` cannot serve https (naming the file and the fix), or None. Read before the
    store is opened; an encrypted key is refused here, where the TLS library would prompt for its password."""
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        return "TLS needs both --tls-cert and --tls-key (or neither, for plain http on loopback)"
    from cryptography import x509
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization

    from medtee.files import NotRegularFile, read_regular

    data = {}
    for flag, path in (("--tls-cert", cert), ("--tls-key", key)):
        try:
            data[flag] = read_regular(path, MAX_TLS_FILE_BYTES)
        except FileNotFoundError:
            return f"{flag} {path}: no such file"
        except NotRegularFile as e:
            return f"{flag} {path} {e}; name a PEM file"
        except OSError as e:
            return f"{flag} {path}: cannot read it ({e.strerror or type(e).__name__})"
    try:
        chain = x509.load_pem_x509_certificates(data["--tls-cert"])
    except ValueError:
        return (f"--tls-cert {cert} is not a PEM certificate (no valid -----BEGIN CERTIFICATE----- block); "
                f"pass the server's certificate chain in PEM")
    try:
        private = serialization.load_pem_private_key(data["--tls-key"], password=None)
    except TypeError:
        return f"--tls-key {key} is encrypted with a password; pass an unencrypted PEM key (protect it with chmod 600)"
    except (ValueError, UnsupportedAlgorithm):
        return (f"--tls-key {key} is not a PEM private key (no valid -----BEGIN ... PRIVATE KEY----- block); "
                f"pass the private key of --tls-cert {cert}")
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if private.public_key().public_bytes(*spki) != chain[0].public_key().public_bytes(*spki):
        return f"--tls-key {key} is not the private key of --tls-cert {cert} (its first certificate); pass the matching pair"
    return None


def _serve(args: argparse.Namespace) -> int:
    port = _given(args.port)
    if not 0 <= port <= MAX_PORT:
        return exits.fail(f"--port must be 0-{MAX_PORT} (got {port}); 0 picks a free port")
    from medtee.sealing.cli import dir_problem

    problem = (dir_problem("--broker-dir", args.store, "name a directory (the broker's store, created if missing)")
               or _tls_problem(args.tls_cert, args.tls_key))
    if problem:
        return exits.fail(problem)
    from medtee.broker.audit import AuditLogDamaged, mark_path, verify
    from medtee.broker.store import StoreError

    log = Path(args.store) / "audit.log"
    report = verify(log) if log.exists() or os.path.lexists(mark_path(log)) else None
    if report is not None and not report.ok:
        fix = "" if report.mark_problem else f"; restore {log} from its newest copy, then serve again"
        return exits.fail(f"the audit log fails verification after {report.entries} good entries ({report.problem}), "
                          f"so the broker will not add decisions to it{fix}", exits.REFUSED)
    from medtee.broker.server import Limits, serve

    limits = Limits(max_connections=_given(args.max_connections), idle_timeout_s=_given(args.idle_timeout),
                    body_timeout_s=_given(args.body_timeout), handshake_timeout_s=_given(args.handshake_timeout),
                    max_connections_per_client=_given(args.max_connections_per_client))
    try:
        serve(args.store, host=args.host, port=port, tls_cert=args.tls_cert, tls_key=args.tls_key, limits=limits,
              nonce_ttl_s=args.nonce_ttl, max_challenges_per_dataset=args.max_challenges_per_dataset,
              max_challenges_per_client=args.max_challenges_per_client,
              announce=lambda url: print(f"medtee key broker listening on {url}", flush=True))
    except (AuditLogDamaged, StoreError) as e:  # changed between the check above and the broker's own; rotating
        return exits.fail(str(e), exits.REFUSED)
    except (OSError, ValueError, OverflowError) as e:
        return exits.fail(f"cannot serve on {args.host}:{port}: {e}")
    return exits.OK


def _audit(args: argparse.Namespace) -> int:
    """`broker audit verify`: the chain; `broker audit budget`: the chain, then each dataset's privacy spent."""
    from medtee.broker.audit import verify

    store = Path(args.store)
    if store.exists() and not store.is_dir():
        return exits.fail(f"--broker-dir {store} is a file, not a broker store; pass the store's directory "
                          f"(default {DEFAULT_BROKER_DIR})")
    if not (store / f"{BROKER_KEY_NAME}.key").is_file():
        return exits.fail(f"no broker store at {store} (no {BROKER_KEY_NAME}.key); pass the store's --broker-dir "
                          f"(default {DEFAULT_BROKER_DIR})")
    if args.head is not None and not re.fullmatch(r"[0-9a-f]{64}", args.head):
        return exits.fail(f"--head must be the 64 lowercase hex digits of an audit entry's hash (the head `medtee "
                          f"broker audit verify` printed); got {args.head[:80]!r}")
    anchored: list[int] = []  # the seq of the entry whose hash is --head
    report = verify(store / "audit.log",
                    visit=None if args.head is None else
                    (lambda entry: anchored.append(entry["seq"]) if entry["hash"] == args.head else None))
    if not report.ok:
        return exits.fail(f"audit log FAILED verification after {report.entries} good entries: {report.problem}",
                          exits.REFUSED)
    if args.head is not None and not anchored:
        return exits.fail(f"audit log FAILED the anchored head: none of its {report.entries} entries has hash "
                          f"{args.head}, so the log is not the one anchored (the store was restored from an older "
                          f"copy, or its log rewritten and re-chained); restore the newest copy of the store",
                          exits.REFUSED)
    if args.action == "budget":
        return _print_budgets(store)
    print(f"audit log OK: {report.entries} entries, head {report.head}")
    if anchored:
        print(f"it holds the anchored head {args.head} (entry {anchored[0]}), so entries 0-{anchored[0]} are the "
              f"ones anchored; {report.entries - anchored[0] - 1} came after it")
    if report.unfinished:
        print(f"after them, an unfinished last line ({report.unfinished} bytes): an append that did not complete "
              f"(e.g. a full disk), so no decision was returned for it; the broker drops it at its next append")
    print("anchor the head outside the store (a ticket, a transparency log) and check against it later with "
          "--head HEAD: that detects the whole store (log and mark) restored from an old backup")
    return exits.OK


def _print_budgets(store: Path) -> int:
    from medtee.broker.audit import AuditLogDamaged
    from medtee.broker.service import EmbeddedBroker
    from medtee.broker.store import StoreError
    from medtee.sealing.manifest import SealedDataError

    try:
        broker = EmbeddedBroker(store)
    except (AuditLogDamaged, StoreError) as e:
        return exits.fail(str(e), exits.REFUSED)
    unreadable = 0
    for dataset_id in broker.datasets():
        try:
            policy, limit, spent = broker.privacy_spent(dataset_id)
        except SealedDataError as e:  # the others are still printed; the exit status says one is missing
            exits.say(f"{dataset_id}: {e}")
            unreadable += 1
            continue
        if limit is None:
            bound = f"policy '{policy}' unreadable"
        elif limit.bounds():
            bound = "budget " + ", ".join(f"{name} {value:g}" for name, value in
                                          (("epsilon", limit.epsilon), ("delta", limit.delta)) if value is not None)
        else:
            bound = "no budget"
        print(f"{dataset_id}: {spent.describe()}; {bound} (policy {policy})")
    return exits.BAD_INPUT if unreadable else exits.OK


def _policy_verb(act):
    """A `broker policy` handler around `act(broker, args)`: the store must exist; a refusal is one line, exit 2."""
    def handler(args: argparse.Namespace) -> int:
        from medtee.broker.audit import AuditLogDamaged
        from medtee.broker.protocol import UnknownDatasetError
        from medtee.broker.service import EmbeddedBroker
        from medtee.broker.store import StoreError

        if not (Path(args.store) / f"{BROKER_KEY_NAME}.key").is_file():
            return exits.fail(f"no broker store at {args.store} (no {BROKER_KEY_NAME}.key); pass the store's "
                              f"--broker-dir, or create it by sealing a dataset (`medtee seal`)")
        try:
            act(EmbeddedBroker(args.store), args)
        except (UnknownDatasetError, ValueError, OSError) as e:
            return exits.fail(str(e).splitlines()[0])
        except (AuditLogDamaged, StoreError) as e:
            return exits.fail(str(e), exits.REFUSED)
        return exits.OK

    return handler


def _warn_about(broker, name: str) -> None:
    from medtee.attestation.policy import read_policy_file, release_warning

    warning = release_warning(read_policy_file(broker.policy_file(name)[0], name=name).policy)
    if warning:
        print(warning, file=sys.stderr)


def _policy_add(broker, args: argparse.Namespace) -> None:
    from medtee.config import rule_key_problems

    digest = broker.add_policy(args.name, args.file, vet=rule_key_problems)
    print(f"stored release policy '{args.name}' (sha256 {digest}) in {broker.policy_file(args.name)[0]}")
    print(f"apply it with: medtee broker policy set DATASET_ID {args.name}")
    _warn_about(broker, args.name)


def _no_store_note(store: Path) -> None:
    if not (store / f"{BROKER_KEY_NAME}.key").is_file():
        exits.say(f"no broker store at {store} (no {BROKER_KEY_NAME}.key): shipped policies only; pass the store's "
                  f"--broker-dir for its own")


def _policy_list(args: argparse.Namespace) -> int:
    """`policy list`: reads the store's policies, if it has any, and the shipped ones; needs no store."""
    from medtee.broker.store import policies

    _no_store_note(Path(args.store))
    for name, kind in policies(Path(args.store)):
        print(f"{name}\t{kind}")
    return exits.OK


def _policy_show(args: argparse.Namespace) -> int:
    """`policy show NAME`: the store's file, else the shipped one; needs no store (a fresh host starts from one)."""
    from medtee.broker.store import policy_file

    _no_store_note(Path(args.store))
    try:
        text = policy_file(Path(args.store), args.name)[0].read_text(encoding="utf-8")
    except (ValueError, OSError) as e:
        return exits.fail(str(e).splitlines()[0])
    print(text, end="")
    return exits.OK


def _policy_set(broker, args: argparse.Namespace) -> None:
    broker.set_policy(args.dataset_id, args.name)
    print(f"dataset {args.dataset_id}: release policy is now '{args.name}' (effective at the next release)")
    _warn_about(broker, args.name)


def _broker_dir_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--broker-dir", "--store", dest="store", default=DEFAULT_BROKER_DIR, metavar="DIR",
                        help=f"the broker's store directory (default {DEFAULT_BROKER_DIR}; --store is the old name)")


def _add_serve(broker_sub) -> None:
    srv = broker_sub.add_parser("serve", help="serve challenge/attest/release over HTTP (loopback by default)")
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    srv.add_argument("--port", type=int, default=_ServerDefault("DEFAULT_PORT"),
                     help="port, 0-65535 (default %(default)s; 0 picks a free one)")
    _broker_dir_argument(srv)
    srv.add_argument("--tls-cert", default=None, help="PEM certificate chain: serve https")
    srv.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")
    for flag, kind, default, text in (
            ("--nonce-ttl", float, DEFAULT_NONCE_TTL_S, "seconds a challenge nonce stays valid"),
            ("--max-challenges-per-dataset", int, DEFAULT_MAX_CHALLENGES_PER_DATASET,
             "outstanding challenges per dataset; more get 429"),
            ("--max-challenges-per-client", int, DEFAULT_MAX_CHALLENGES_PER_CLIENT,
             "outstanding challenges per client address; more get 429"),
            ("--max-connections", int, _ServerDefault("max_connections"),
             "open connections; a request beyond gets 503"),
            ("--max-connections-per-client", int, _ServerDefault("max_connections_per_client"),
             "open connections from one client address; one beyond is closed at once"),
            ("--idle-timeout", float, _ServerDefault("idle_timeout_s"),
             "seconds a connection may take to send a request's headers"),
            ("--body-timeout", float, _ServerDefault("body_timeout_s"), "seconds a request may take to send its body"),
            ("--handshake-timeout", float, _ServerDefault("handshake_timeout_s"),
             "seconds a connection may take to complete its TLS handshake")):
        srv.add_argument(flag, type=_positive(kind), default=default, help=f"{text} (default %(default)s)")
    srv.set_defaults(handler=_serve)


def _verb(verbs, name: str, act, text: str, *positionals: tuple[str, str], reads: bool = False) -> None:
    """Register `broker policy NAME POSITIONALS... [--broker-dir DIR]` running `act(broker, args)`, or, for a verb
    that only `reads`, `act(args)` (no store needed)."""
    parser = verbs.add_parser(name, help=text)
    for arg, arg_help in positionals:
        parser.add_argument(arg, help=arg_help)
    _broker_dir_argument(parser)
    parser.set_defaults(handler=act if reads else _policy_verb(act))


def _add_policy(broker_sub) -> None:
    pol = broker_sub.add_parser("policy", help="the release policy store; set a dataset's policy (no restart)",
                                description="Release policies are read from the broker's store "
                                            "(DIR/policies/NAME.yaml) first, then from the shipped conf/attestation/.")
    verbs = pol.add_subparsers(dest="policy_command", metavar="VERB", required=True)
    name = ("name", "policy name: letters, digits, _ -")
    _verb(verbs, "add", _policy_add, "validate a policy file and store it as NAME (replacing a stored NAME)",
          ("name", "policy name: letters, digits, _ -; not a shipped policy's name"),
          ("file", "policy YAML, the schema of conf/attestation/*.yaml"))
    _verb(verbs, "list", _policy_list, "the store's and the shipped policies, each marked store or shipped", reads=True)
    _verb(verbs, "show", _policy_show, "print policy NAME's file (the store's, else the shipped one)", name, reads=True)
    _verb(verbs, "set", _policy_set, "set a dataset's release policy (effective at the next release)",
          ("dataset_id", "a registered dataset"), ("name", "a store or shipped policy name"))


def add_parser(subparsers) -> None:
    """Register `broker serve|audit|policy` on the `medtee` subparsers."""
    broker = subparsers.add_parser("broker", help="run the key broker service; audit; release policies")
    broker_sub = broker.add_subparsers(dest="broker_command", metavar="ACTION", required=True)
    _add_serve(broker_sub)
    aud = broker_sub.add_parser("audit", help="check the broker's hash-chained audit log")
    aud.add_argument("action", choices=["verify", "budget"],
                     help="verify: check the chain; budget: check it, then print the privacy each dataset's releases "
                          "have spent (basic composition) against its policy's recipe.dp_budget")
    _broker_dir_argument(aud)
    aud.add_argument("--head", metavar="HASH",
                     help="a head printed by an earlier `audit verify` and kept outside the store: the log must hold "
                          "the entry with that hash (a store restored from an older copy, or a log rewritten and "
                          "re-chained with its mark, does not)")
    aud.set_defaults(handler=_audit)
    _add_policy(broker_sub)
