"""Subcommands of the data owner: seal, dataset inspect, keys new|rotate (`broker ...` is in medtee.broker.cli).

Handlers return 0 (ok), 1 (refused) or 2 (bad input, with a message naming the file or field and the fix).
Nothing here prints record content: summaries are counts, digests and ids.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from medtee import exits
from medtee.broker.protocol import DEFAULT_BROKER_DIR
from medtee.crypto.hpke import DEFAULT_SCHEME, Scheme
from medtee.sealing.seal import DEFAULT_ROWS_PER_SHARD

# --rows-per-shard's bound: a shard's records are held in memory while it is sealed, so past 10 million rows one
# shard would need gigabytes of memory
MAX_ROWS_PER_SHARD = 10_000_000

if TYPE_CHECKING:
    from medtee.attestation.policy import PolicyFile

SCHEMES = tuple(s.value for s in Scheme)
_SCHEME_HELP = f"{'|'.join(s.name for s in Scheme)} (the older spellings {', '.join(SCHEMES)} work too)"


def _scheme(text: str) -> str:
    """A --scheme value as the scheme's value: the enum member name (hpke_x25519, as in recipes) or the value
    (hpke-x25519, the older spelling)."""
    if text in Scheme.__members__:
        return Scheme[text].value
    if text in SCHEMES:
        return text
    raise argparse.ArgumentTypeError(f"unknown scheme {text!r}; use {' or '.join(Scheme.__members__)}")


def dir_problem(flag: str, path: Path | str, fix: str = "name a directory (it is created if missing)") -> str | None:
    """Why `path` cannot be (or become) a directory: it, or a parent of it, is a file; else None."""
    path = Path(path)
    for p in (path, *path.parents):
        if p.exists() and not p.is_dir():
            what = "is a file" if p == path else f"is inside {p}, which is a file"
            return f"{flag} {path} {what}; {fix}"
        if p.is_symlink() and not p.exists():
            what = "is a link to nothing" if p == path else f"is inside {p}, a link to nothing"
            return f"{flag} {path} {what}; {fix}"
    return None


def _summary(manifest, path: Path) -> str:
    m = manifest
    lines = [
        f"dataset        {m.dataset_id}",
        f"path           {path}",
        f"records        {m.record_count}   messages {m.message_count}   characters {m.char_count}",
        f"tokens         {m.token_count}   tokenizer {m.tokenizer}" if m.token_count is not None
        else "token count: not recorded (seal with --tokenizer)",
        f"cipher         Parquet Modular Encryption {m.cipher}, encrypted footer",
        f"data key       wrapped with {m.scheme} to broker key {m.key_id}",
        f"release policy {m.release_policy}",
        f"classification {m.classification}   data-use agreement {m.dua_id or '-'}",
        f"created        {m.created}",
        f"owner key      {m.owner_key_id()}",
        f"manifest       sha256 {m.digest()}",
        f"canaries       {m.canaries.inserted} inserted in {m.canaries.records} added records, {m.canaries.controls} "
        f"never-inserted controls (encrypted in {m.canaries.name})" if m.canaries is not None else "canaries: none",
        f"shards         {len(m.shards)}",
    ]
    lines += [f"  {s.name}  {s.rows:>8} rows  {s.bytes:>12} bytes  sha256 {s.sha256}" for s in m.shards]
    return "\n".join(lines)


def _policy_first(args: argparse.Namespace) -> PolicyFile | None:
    """`--policy` decided before anything is written or any store is made: a FILE read once and validated
    (returned; one named like a shipped policy must be that policy); a NAME only the shipped policies can hold (a
    remote broker, or no embedded store yet) loaded. ValueError with the fix."""
    from medtee.attestation.policy import (
        POLICY_NAME,
        check_not_shipped_lookalike,
        is_policy_path,
        load_policy,
        read_policy_file,
    )
    from medtee.config import rule_key_problems

    remote = args.broker != "embedded"
    if is_policy_path(args.policy):
        if remote:
            raise ValueError(f"--policy {args.policy}: a remote broker enforces only the policies in its own store, "
                             f"which cannot be written from here; on the broker's host run `medtee broker policy add "
                             f"NAME {args.policy}`, seal under a shipped policy, then run `medtee broker policy set "
                             f"DATASET_ID NAME` there")
        file = read_policy_file(args.policy)
        name = file.policy.name
        if problems := rule_key_problems(file.policy, str(file.path)):
            raise ValueError("; ".join(problems))
        if not POLICY_NAME.fullmatch(name):
            raise ValueError(f"policy file {file.path}: its name '{name}' (its name: key, else the file stem) is what "
                             f"the manifest records and must be 1-64 letters, digits, _ or -; set name: in it")
        return check_not_shipped_lookalike(file)
    if remote or not (Path(args.broker_dir) / "broker.key").is_file():
        try:
            load_policy(args.policy)
        except ValueError as e:
            fix = ("a remote broker's store cannot be read from here: seal under a shipped policy, then run `medtee "
                   "broker policy set DATASET_ID NAME` on the broker's host") if remote else \
                f"the broker store {args.broker_dir} does not exist yet: give the policy's YAML file (--policy FILE)"
            raise ValueError(f"{e}; {fix}") from None
    return None


def _release_policy(broker, args: argparse.Namespace, file: PolicyFile | None) -> tuple[PolicyFile, bool]:
    """(the policy file the embedded `broker` enforces for `--policy`, as read, whether this seal added it to the
    store). A NAME resolves as at release (the store, then shipped); a FILE is the shipped policy of its name, or
    is claimed in the store under its name with the bytes read once (`claim_policy`: never replacing another
    policy of that name). The broker registers the dataset only if that file still holds these bytes then."""
    from medtee.attestation.policy import PolicyFile, read_policy_file

    if file is None:
        return read_policy_file(broker.policy_file(args.policy)[0], name=args.policy), False
    name = file.policy.name
    if any(n == name and where == "shipped" for n, where in broker.policies()):
        return read_policy_file(broker.policy_file(name)[0], name=name), False
    added = broker.claim_policy(name, file.data, str(file.path))
    return PolicyFile(path=broker.policy_file(name)[0], data=file.data, policy=file.policy), added


def _seal(args: argparse.Namespace) -> int:
    from medtee.audit.canaries import check_plan_size, parse_repeats, plan_canaries
    from medtee.broker import connect
    from medtee.broker.audit import AuditLogDamaged
    from medtee.crypto.hpke import KeyWrapError
    from medtee.sealing.seal import check_out_dir, read_input, seal_located

    if not 1 <= args.rows_per_shard <= MAX_ROWS_PER_SHARD:
        return exits.fail(f"--rows-per-shard must be 1-{MAX_ROWS_PER_SHARD} (got {args.rows_per_shard})")
    problem = dir_problem("--broker-dir", args.broker_dir) if args.broker == "embedded" else None
    if problem:
        return exits.fail(problem)
    try:
        if args.canaries is not None:  # its bounds before anything is read or counted
            check_plan_size(args.canaries, parse_repeats(args.canary_repeats))
        file = _policy_first(args)
        check_out_dir(args.out)
        records = read_input(args.input, args.format)  # the file, its header and first record: before any output
        plan = None
        if args.canaries is not None:  # a first pass counts the records, so that the canaries spread over them all
            plan = plan_canaries(args.canaries, parse_repeats(args.canary_repeats), seed=args.canary_seed,
                                 real_records=sum(1 for _ in read_input(args.input, args.format)))
        if args.scheme and args.broker != "embedded":
            return exits.fail("--scheme applies to a new embedded broker store; a remote broker has its own key")
        if args.broker == "embedded" and args.scheme:
            from medtee.broker.service import EmbeddedBroker

            broker = EmbeddedBroker(args.broker_dir, scheme=args.scheme)
            if broker.public_key()[0].value != args.scheme:
                return exits.fail(f"the broker store {args.broker_dir} already uses {broker.public_key()[0].value}; "
                             f"change it with `medtee keys rotate --broker-dir {args.broker_dir} --scheme {args.scheme}`")
        else:
            broker = connect(args.broker, store_dir=args.broker_dir)
        if args.broker == "embedded":
            enforced, added = _release_policy(broker, args, file)
            policy, source, digest = enforced.policy, enforced.path, enforced.sha256
        else:
            from medtee.attestation import load_policy

            policy, source, digest, added = load_policy(args.policy), None, None, False
        try:
            manifest = seal_located(records, args.out, broker=broker, policy=policy.name, dataset_id=args.dataset_id,
                                    rows_per_shard=args.rows_per_shard, classification=args.classification,
                                    dua_id=args.dua_id, tokenizer=args.tokenizer, canaries=plan,
                                    policy_sha256=digest)
        except BaseException:
            if added:  # a refused seal leaves the store as it found it
                broker.withdraw_policy(policy.name, file.data)
            raise
    except (KeyWrapError, FileExistsError, FileNotFoundError, ValueError) as e:  # InputError, OutputError, DataError
        return exits.fail(str(e))
    except (PermissionError, AuditLogDamaged) as e:
        return exits.fail(str(e), exits.REFUSED)
    except RuntimeError as e:  # an unreachable or failing remote broker
        return exits.fail(str(e), exits.REFUSED)
    from medtee.attestation.policy import release_warning

    if release_warning(policy):
        print(release_warning(policy), file=sys.stderr)
    print(f"sealed {manifest.record_count} records into {args.out}")
    print(_summary(manifest, Path(args.out)))
    if source is not None:
        print(f"the broker enforces release policy '{policy.name}' as {source}")
    return exits.OK


def _inspect(args: argparse.Namespace) -> int:
    from medtee.sealing.manifest import SealedDataError
    from medtee.sealing.reader import open_dataset

    if args.command == "data":
        print("medtee: `medtee data inspect` is now `medtee dataset inspect`", file=sys.stderr)
    trusted = None
    try:
        if args.owner_key:
            from medtee.crypto.signing import load_public

            trusted = load_public(args.owner_key)
        ds = open_dataset(args.dir, trusted_owner=trusted)
    except (SealedDataError, ValueError, FileNotFoundError) as e:
        return exits.fail(f"{e}")
    print(_summary(ds.manifest, ds.path))
    who = "the trusted owner key" if trusted else "the owner key it names (pass --owner-key to pin it)"
    print(f"signature      OK, by {who}")
    print(f"integrity      OK: all {len(ds.manifest.shards)} shards present and match their digests")
    return exits.OK


def _keys_new(args: argparse.Namespace) -> int:
    from medtee.crypto import hpke

    problem = dir_problem("--out", args.out)
    if problem:
        return exits.fail(problem)
    try:
        public = hpke.write_keypair(Path(args.out), args.name, args.scheme)
    except (FileExistsError, ValueError) as e:
        return exits.fail(str(e))
    scheme, pub = hpke.load_public_key(public)
    print(f"public key   {public}   (give this to whoever encrypts to you)")
    print(f"private key  {public.with_suffix('.key')}   (mode 0600; keep it secret, back it up)")
    print(f"scheme {scheme.value}   key id {hpke.key_id(scheme, pub)}")
    return exits.OK


def _keys_rotate(args: argparse.Namespace) -> int:
    from medtee.broker.audit import AuditLogDamaged
    from medtee.broker.protocol import UnknownDatasetError
    from medtee.broker.store import RotationInterrupted, StoreError, rotate
    from medtee.sealing.manifest import SealedDataError

    problem = dir_problem("--broker-dir", args.broker_dir, "name the broker store the datasets were sealed with")
    if problem:
        return exits.fail(problem)
    if not (Path(args.broker_dir) / "broker.key").exists():
        return exits.fail(f"{args.broker_dir} holds no broker key; pass the --broker-dir the datasets were sealed with")
    try:
        manifests = rotate(args.broker_dir, [Path(d) for d in args.datasets], scheme=args.scheme)
    except (UnknownDatasetError, SealedDataError, FileExistsError, PermissionError, ValueError) as e:
        return exits.fail(str(e))
    except (AuditLogDamaged, StoreError, RotationInterrupted) as e:
        return exits.fail(str(e), exits.REFUSED)
    except OSError as e:  # before the commit point (a full disk while staging): the staging was removed
        return exits.fail(f"rotating the broker key in {args.broker_dir} failed and changed nothing: {e}", exits.REFUSED)
    print(f"rotated the broker key in {args.broker_dir}; {len(manifests)} data key(s) re-wrapped, no data re-encrypted")
    for m in manifests:
        print(f"  {m.dataset_id}: key {m.key_id} ({m.scheme}), manifest sha256 {m.digest()}")
    listed = {Path(d) for d in args.datasets}
    if len(listed) < len(manifests):
        print("copy the new manifest.json of datasets not listed on the command line from "
              f"{Path(args.broker_dir) / 'datasets'} (field 'manifest') or rerun with their directories")
    return exits.OK


def add_parsers(subparsers) -> None:
    """Register seal, data and keys on the `medtee` subparsers."""
    from medtee.audit.canaries import MAX_CANARIES_PER_REPEAT, MAX_CANARY_RECORDS

    seal = subparsers.add_parser("seal", help="encrypt chat dialogues into a sealed dataset (data owner)")
    seal.add_argument("input", help="chat JSONL, CSV transcript (id + Doctor:/Patient: lines) or plain Parquet")
    seal.add_argument("--out", required=True, help="new (or empty) directory for the sealed dataset")
    seal.add_argument("--policy", default="simulated", metavar="NAME|FILE",
                      help="attestation policy the broker requires before releasing the key: a shipped name, a name "
                           "in the --broker-dir store, or a policy YAML file (added to that store under its name); "
                           "default: simulated, development only")
    seal.add_argument("--broker", default="embedded", help="'embedded' (default) or the URL of `medtee broker serve`")
    seal.add_argument("--broker-dir", "--store", dest="broker_dir", default=DEFAULT_BROKER_DIR, metavar="DIR",
                      help=f"broker store / owner signing key directory; its policies/ hold the store policies "
                           f"--policy can name (default {DEFAULT_BROKER_DIR}; --store is the old name)")
    seal.add_argument("--scheme", type=_scheme, default=None, metavar="SCHEME",
                      help=f"key scheme of a NEW embedded broker store: {_SCHEME_HELP} (default hybrid post-quantum)")
    seal.add_argument("--dataset-id", default=None, help="dataset id (default: random ds-XXXXXXXXXXXX)")
    seal.add_argument("--format", choices=("jsonl", "csv", "parquet"), default=None, help="input format (default: from suffix)")
    seal.add_argument("--rows-per-shard", type=int, default=DEFAULT_ROWS_PER_SHARD,
                      help=f"records per encrypted shard, 1-{MAX_ROWS_PER_SHARD} (default {DEFAULT_ROWS_PER_SHARD})")
    seal.add_argument("--classification", default="phi", help="data classification label recorded in the manifest")
    seal.add_argument("--dua-id", default="", help="data-use agreement id recorded in the manifest")
    seal.add_argument("--tokenizer", default=None,
                      help="record the token count of the Gemma 3 chat-formatted text: 'demo' or a local Hugging "
                           "Face tokenizer directory / cached id (never downloaded); default: not recorded")
    seal.add_argument("--canaries", type=int, default=None, metavar="N",
                      help="memorization audit: insert N random canaries per repeat count as added synthetic records "
                           f"and seal N never-inserted controls, all encrypted (docs/audit.md); N is 1-"
                           f"{MAX_CANARIES_PER_REPEAT} and adds at most {MAX_CANARY_RECORDS} records; default: none")
    seal.add_argument("--canary-repeats", default="1,4,16,64", metavar="R,R,...",
                      help="how many times each group of N canaries is inserted (default 1,4,16,64)")
    seal.add_argument("--canary-seed", type=int, default=None,
                      help="draw the canaries reproducibly from this seed (tests only: the seed reveals them); "
                           "default: the OS's randomness")
    seal.set_defaults(handler=_seal)

    data = subparsers.add_parser("dataset", aliases=["data"], help="inspect sealed datasets (`data` is the old name)")
    data_sub = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    insp = data_sub.add_parser("inspect", help="show a sealed dataset's manifest and verify signature and shards (no key)")
    insp.add_argument("dir", help="sealed dataset directory")
    insp.add_argument("--owner-key", default=None, help="pin the data owner's public key (owner-signing.pub)")
    insp.set_defaults(handler=_inspect)

    keys = subparsers.add_parser("keys", help="create key pairs; rotate the broker key")
    keys_sub = keys.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    new = keys_sub.add_parser("new", help="create a recipient key pair (e.g. the key the adapter is encrypted to)")
    new.add_argument("--out", required=True, help="directory for NAME.key (0600) and NAME.pub")
    new.add_argument("--name", default="recipient", help="file name stem (default recipient)")
    new.add_argument("--scheme", type=_scheme, default=DEFAULT_SCHEME.value, metavar="SCHEME",
                     help=f"HPKE scheme: {_SCHEME_HELP} (default hybrid post-quantum)")
    new.set_defaults(handler=_keys_new)
    rot = keys_sub.add_parser("rotate", help="new broker key; re-wrap every registered data key (no re-encryption)")
    rot.add_argument("datasets", nargs="*", help="sealed dataset directories whose manifest.json to update")
    rot.add_argument("--broker-dir", "--store", dest="broker_dir", default=DEFAULT_BROKER_DIR, metavar="DIR",
                     help=f"broker store (default {DEFAULT_BROKER_DIR}; --store is the old name)")
    rot.add_argument("--scheme", type=_scheme, default=None, metavar="SCHEME",
                     help=f"scheme of the new key: {_SCHEME_HELP} (default: unchanged)")
    rot.set_defaults(handler=_keys_rotate)
