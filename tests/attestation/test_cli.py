import argparse

import pytest

from medtee.attestation.cli import add_parser


def run(*argv):
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    args = parser.parse_args(["attest", "verify", *argv])
    return args.handler(args)


def test_genuine_evidence_exits_0(vectors, capsys):
    rc = run("--snp-report", str(vectors / "snp/automata/report.bin"),
             "--snp-cert", str(vectors / "snp/automata/vek_cert.der"),
             "--gpu-report", str(vectors / "nvidia/nvtrust/local_gpu_verifier_samples/hopperAttestationReport.txt"),
             "--gpu-certs", str(vectors / "nvidia/nvtrust/local_gpu_verifier_samples/hopperCertChain.txt"),
             "--policy", "authenticity")
    assert rc == 0 and capsys.readouterr().out.startswith("ACCEPTED")


def test_vlek_with_clock_and_json(vectors, capsys):
    rc = run("--snp-report", str(vectors / "snp/trustee/snp/test-vlek-report.bin"),
             "--snp-cert", str(vectors / "snp/trustee/snp/test-vlek.der"), "--at", "2025-06-01T00:00:00",
             "--policy", "authenticity", "--json")
    assert rc == 0 and '"ok": true' in capsys.readouterr().out


def test_rejected_evidence_exits_1_listing_checks(vectors, capsys):
    rc = run("--snp-report", str(vectors / "snp/go-sev-guest/attestation.bin"),
             "--snp-cert", str(vectors / "snp/go-sev-guest/vcek.testcer"), "--policy", "snp_h100")
    out = capsys.readouterr().out
    assert rc == 1 and "policy.debug: expected DEBUG=0, got DEBUG=1" in out


def test_wrong_nonce_exits_1(vectors):
    assert run("--snp-report", str(vectors / "snp/automata/report.bin"),
               "--snp-cert", str(vectors / "snp/automata/vek_cert.der"), "--nonce", "00" * 64,
               "--policy", "authenticity") == 1


@pytest.mark.parametrize("extra", [
    ["--snp-report", "/nonexistent/report.bin"],
    ["--nonce", "xyz"],
    ["--at", "yesterday"],
    [],
])
def test_unusable_input_exits_2(vectors, capsys, extra):
    base = ["--snp-report", str(vectors / "snp/automata/report.bin")] if "--snp-report" not in extra and extra else []
    assert run(*base, *extra, "--policy", "authenticity") == 2
    assert "medtee: attest verify:" in capsys.readouterr().err


def test_unknown_policy_exits_2(capsys):
    assert run("--snp-report", "x", "--policy", "nope") == 2
