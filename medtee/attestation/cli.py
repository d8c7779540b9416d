"""`medtee attest verify`: appraise evidence files under a policy, shipped or a YAML file (exit 0 pass, 1 rejected, 2
unusable input)."""

from __future__ import annotations

import argparse

MAX_EVIDENCE_FILE_BYTES = 1 << 20  # a report is 1184 bytes, a certificate chain or a GPU report a few KiB


def add_parser(subparsers) -> None:
    """Register `attest verify` on an argparse subparsers object."""
    attest = subparsers.add_parser("attest", help="verify attestation evidence")
    sub = attest.add_subparsers(dest="attest_command", required=True)
    verify = sub.add_parser("verify", help="verify SEV-SNP and NVIDIA GPU evidence files under a policy",
                            description="Give the CPU evidence (--snp-report), the GPU evidence (--gpu-report with "
                                        "--gpu-certs) or both. Exit 0 when every check passes, 1 when the evidence "
                                        "is rejected (each failed check listed), 2 on unusable input.")
    verify.add_argument("--snp-report", metavar="FILE",
                        help="raw 1184-byte SEV-SNP report (GPU evidence alone is checked only under an "
                             "authenticity_only policy such as 'authenticity')")
    verify.add_argument("--snp-cert", metavar="FILE", action="append", default=[],
                        help="VCEK/VLEK (and optional ASK/ARK), PEM or DER; repeatable. Missing AMD roots come from "
                             "the bundle; a missing VCEK from the policy's cache directory")
    verify.add_argument("--gpu-report", metavar="FILE", action="append", default=[],
                        help="GPU SPDM report as hex text (as NVML returns it); repeatable, one per GPU")
    verify.add_argument("--gpu-certs", metavar="FILE", action="append", default=[],
                        help="the GPU's PEM certificate chain, leaf first; one per --gpu-report")
    verify.add_argument("--nonce", metavar="HEX", help="expected REPORT_DATA (64 bytes hex; shorter is zero-padded)")
    verify.add_argument("--gpu-nonce", metavar="HEX", help="expected 32-byte GPU nonce (hex)")
    verify.add_argument("--at", metavar="ISO-TIME", help="verify as of this time (default: now; naive = UTC)")
    verify.add_argument("--policy", required=True, metavar="NAME|FILE",
                        help="a policy name in conf/attestation/ (e.g. authenticity) or a policy YAML file")
    verify.add_argument("--json", action="store_true", help="print the verdict as JSON")
    verify.set_defaults(handler=run_verify)


def _hex(value: str, what: str, size: int | None, pad: int | None = None) -> bytes:
    try:
        data = bytes.fromhex(value)
    except ValueError:
        raise ValueError(f"{what} is not hex") from None
    if pad is not None and len(data) <= pad:
        data = data.ljust(pad, b"\0")
    if size is not None and len(data) != size:
        raise ValueError(f"{what} must be {size} bytes; got {len(data)}")
    return data


def _load(args: argparse.Namespace):
    from datetime import datetime, timezone

    from cryptography.hazmat.primitives.serialization import Encoding

    from medtee.attestation.certs import parse_certificates
    from medtee.attestation.evidence import Evidence, EvidenceFormatError, GpuEvidence
    from medtee.attestation.nvidia import parse_hex_report, parse_spdm
    from medtee.attestation.policy import resolve_policy
    from medtee.attestation.snp import SnpReport
    from medtee.files import NotRegularFile, read_regular

    policy = resolve_policy(args.policy)
    if not args.snp_report and not args.gpu_report:
        raise ValueError("give --snp-report (the raw 1184-byte SEV-SNP report), --gpu-report with --gpu-certs, or both")
    if (args.snp_cert or args.nonce) and not args.snp_report:
        raise ValueError("--snp-cert and --nonce go with --snp-report")
    if len(args.gpu_report) != len(args.gpu_certs):
        raise ValueError("give one --gpu-certs per --gpu-report")

    def parsed(path: str, parse):
        """parse(the file's bytes); unreadable or malformed input is a ValueError naming the file."""
        try:
            return parse(read_regular(path, MAX_EVIDENCE_FILE_BYTES))
        except NotRegularFile as exc:
            raise ValueError(f"{path} {exc}") from None
        except OSError as exc:
            raise ValueError(f"cannot read {path}: {exc.strerror}") from None
        except EvidenceFormatError as exc:
            raise ValueError(f"{path}: {exc}") from None

    def ders(path: str) -> tuple[bytes, ...]:
        return tuple(c.public_bytes(Encoding.DER) for c in parsed(path, parse_certificates))

    def gpu_report(data: bytes) -> bytes:
        report = parse_hex_report(data)
        parse_spdm(report)
        return report

    gpus = tuple(GpuEvidence(report=parsed(rep, gpu_report), certificates=ders(certs))
                 for rep, certs in zip(args.gpu_report, args.gpu_certs))
    snp_report = parsed(args.snp_report, lambda data: SnpReport.parse(data).raw) if args.snp_report else b""
    evidence = Evidence(provider="file", snp_report=snp_report,
                        certificates=tuple(d for p in args.snp_cert for d in ders(p)), gpus=gpus)
    now = None
    if args.at:
        try:
            now = datetime.fromisoformat(args.at)
        except ValueError:
            raise ValueError(f"--at '{args.at}' is not an ISO 8601 time") from None
        now = now if now.tzinfo else now.replace(tzinfo=timezone.utc)
    rd = _hex(args.nonce, "--nonce", 64, pad=64) if args.nonce else None
    gn = _hex(args.gpu_nonce, "--gpu-nonce", 32) if args.gpu_nonce else None
    return evidence, policy, rd, gn, now


def run_verify(args: argparse.Namespace) -> int:
    """Handler of `medtee attest verify`."""
    import json

    from medtee import exits
    from medtee.attestation.appraise import appraise

    try:
        evidence, policy, rd, gn, now = _load(args)
    except ValueError as exc:
        return exits.fail(f"attest verify: {exc}")
    verdict = appraise(evidence, policy, expected_report_data=rd, expected_gpu_nonce=gn, now=now)
    if args.json:
        print(json.dumps(verdict.to_json(), indent=2))
    else:
        print(("ACCEPTED: " if verdict.ok else "REJECTED:\n") + verdict.explain())
    return exits.OK if verdict.ok else exits.REFUSED
