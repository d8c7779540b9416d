"""Bad input to the commands a user types: one line `medtee: ...` naming the problem and the fix, exit 2, before any
work is done; nothing written, nothing overwritten, no traceback, no hang (the QA review's findings)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from conftest import run_medtee
from medtee.cli import main


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def refused(capsys, argv: list[str], *expected: str, code: int = 2) -> str:
    """Run `medtee ARGV` in process; assert exit `code` and one `medtee: ` line holding every `expected` text."""
    assert main(argv) == code
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("medtee: "), err
    assert all(text in lines[0] for text in expected), lines[0]
    assert "Traceback" not in err and "Errno" not in err
    return lines[0]


def tree(root: Path) -> dict[str, str]:
    """Every file under `root`, by relative path, with its sha256: to show that nothing was written or changed."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*")
            if p.is_file()}


@pytest.fixture
def dialogues(tmp_path) -> Path:
    from medtee.data.synthetic import generate_dialogues, write_jsonl

    write_jsonl(generate_dialogues(12, seed=1), tmp_path / "d.jsonl")
    return tmp_path / "d.jsonl"


# broker serve / audit verify

@pytest.mark.parametrize("port", ["-1", "99999", "65536"])
def test_broker_serve_refuses_a_port_out_of_range(tmp_path, capsys, port):
    refused(capsys, ["broker", "serve", "--port", port, "--broker-dir", "b"], "--port must be 0-65535", f"(got {port})")
    assert not (tmp_path / "b").exists()


def test_broker_serve_refuses_a_file_as_its_store(tmp_path, capsys, dialogues):
    before = tree(tmp_path)
    refused(capsys, ["broker", "serve", "--port", "0", "--broker-dir", "d.jsonl"], "--broker-dir d.jsonl is a file",
            "name a directory")
    refused(capsys, ["broker", "serve", "--port", "0", "--store", "d.jsonl/sub"], "inside d.jsonl, which is a file")
    assert tree(tmp_path) == before


def test_broker_serve_names_the_tls_file_that_is_not_pem(tmp_path, capsys, dialogues):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    import datetime

    def pair(stem: str) -> tuple[Path, Path]:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "localhost")])
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
                .sign(key, hashes.SHA256()))
        (tmp_path / f"{stem}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (tmp_path / f"{stem}.key").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        (tmp_path / f"{stem}.enc.key").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret")))
        return tmp_path / f"{stem}.crt", tmp_path / f"{stem}.key"

    cert, key = pair("a")
    _, other_key = pair("b")
    serve = ["broker", "serve", "--port", "0", "--broker-dir", "b"]
    refused(capsys, [*serve, "--tls-cert", "d.jsonl", "--tls-key", "d.jsonl"],
            "--tls-cert d.jsonl is not a PEM certificate")
    refused(capsys, [*serve, "--tls-cert", str(cert), "--tls-key", "d.jsonl"], "--tls-key d.jsonl is not a PEM private key")
    refused(capsys, [*serve, "--tls-cert", str(cert), "--tls-key", str(other_key)], "is not the private key of --tls-cert")
    refused(capsys, [*serve, "--tls-cert", str(cert), "--tls-key", "a.enc.key"], "a.enc.key is encrypted")
    refused(capsys, [*serve, "--tls-cert", "missing.crt", "--tls-key", str(key)], "--tls-cert missing.crt: no such file")
    refused(capsys, [*serve, "--tls-cert", ".", "--tls-key", str(key)], "--tls-cert . is not a regular file")
    refused(capsys, [*serve, "--tls-cert", str(cert)], "TLS needs both --tls-cert and --tls-key")
    assert not (tmp_path / "b").exists()


def test_broker_serve_refuses_an_audit_log_that_fails_verification(tmp_path, capsys, dialogues, monkeypatch):
    from medtee.broker import server

    def started(*args, **kwargs):  # were the refusal to regress, serving would run until pytest's timeout
        raise AssertionError("broker serve started on an audit log that fails verification")

    monkeypatch.setattr(server, "serve", started)
    assert main(["seal", "d.jsonl", "--out", "sealed", "--broker-dir", "b"]) == 0
    capsys.readouterr()
    log = tmp_path / "b" / "audit.log"
    log.write_text(log.read_text().replace('"register"', '"rotate"'))
    before = log.read_bytes()
    refused(capsys, ["broker", "serve", "--port", "0", "--broker-dir", "b"], "fails verification after 0 good entries",
            "entry altered after it was written", "restore b/audit.log from its newest copy", code=1)
    assert log.read_bytes() == before


def test_commands_on_a_store_whose_log_was_rolled_back_refuse_before_any_work(tmp_path, capsys, dialogues):
    assert main(["seal", "d.jsonl", "--out", "s1", "--broker-dir", "b"]) == 0
    log = tmp_path / "b" / "audit.log"
    older = log.read_bytes()
    assert main(["seal", "d.jsonl", "--out", "s2", "--broker-dir", "b", "--dataset-id", "other"]) == 0
    capsys.readouterr()
    log.write_bytes(older)
    before = tree(tmp_path)
    for argv in (["seal", "d.jsonl", "--out", "s3", "--broker-dir", "b", "--dataset-id", "third"],
                 ["broker", "policy", "add", "x", "x.yaml", "--broker-dir", "b"],
                 ["keys", "rotate", "--broker-dir", "b", "s1"]):
        refused(capsys, argv, "b/audit.log does not hold entry 1", "restored from an older copy",
                "Restore the newest copy", code=1)
    assert tree(tmp_path) == before


def test_commands_on_a_store_they_cannot_open_say_so_in_one_line(tmp_path, capsys, dialogues):
    assert main(["seal", "d.jsonl", "--out", "s1", "--broker-dir", "b"]) == 0
    capsys.readouterr()
    lock = tmp_path / "b" / "store.lock"
    lock.unlink()
    lock.symlink_to(tmp_path / "elsewhere")  # opened without following links: fails even as root
    before = tree(tmp_path)
    for argv in (["seal", "d.jsonl", "--out", "s2", "--broker-dir", "b", "--dataset-id", "other"],
                 ["broker", "policy", "add", "x", "x.yaml", "--broker-dir", "b"],
                 ["broker", "audit", "budget", "--broker-dir", "b"],
                 ["keys", "rotate", "--broker-dir", "b", "s1"]):
        refused(capsys, argv, "b", "store.lock", code=1)
    assert tree(tmp_path) == before


def test_audit_verify_names_an_unfinished_last_line(tmp_path, capsys, dialogues):
    assert main(["seal", "d.jsonl", "--out", "sealed", "--broker-dir", "b"]) == 0
    capsys.readouterr()
    with open(tmp_path / "b" / "audit.log", "ab") as f:
        f.write(b'{"seq": 1, "ti')
    assert main(["broker", "audit", "verify", "--broker-dir", "b"]) == 0
    out = capsys.readouterr().out
    assert "audit log OK: 1 entries" in out and "unfinished last line (14 bytes)" in out


def test_audit_verify_without_a_store_is_bad_input_not_tampering(tmp_path, capsys, dialogues):
    for store in (str(tmp_path / "nonexistent"), "empty"):
        (tmp_path / "empty").mkdir(exist_ok=True)
        line = refused(capsys, ["broker", "audit", "verify", "--broker-dir", store], f"no broker store at {store}",
                       "--broker-dir")
        assert "FAILED" not in line and "--store" not in line
    line = refused(capsys, ["broker", "audit", "verify", "--broker-dir", "d.jsonl"], "--broker-dir d.jsonl is a file")
    assert "FAILED" not in line
    assert not (tmp_path / "nonexistent").exists()


def test_audit_verify_of_a_store_whose_log_is_gone_still_fails(tmp_path, capsys, dialogues):
    assert main(["seal", "d.jsonl", "--out", "sealed", "--broker-dir", "b"]) == 0
    capsys.readouterr()
    (tmp_path / "b" / "audit.log").unlink()
    line = refused(capsys, ["broker", "audit", "verify", "--broker-dir", "b"], "FAILED", "audit.log does not exist",
                   code=1)
    assert "--store" not in line


# synth

def test_synth_refuses_an_out_it_cannot_write_before_generating(tmp_path, capsys, dialogues):
    before = tree(tmp_path)
    refused(capsys, ["synth", "--n", "3", "--out", str(tmp_path / "no" / "dir" / "x.jsonl")],
            "directory", "does not exist")
    refused(capsys, ["synth", "--n", "3", "--out", str(tmp_path)], "is a directory; name a file")
    refused(capsys, ["synth", "--n", "3", "--out", "d.jsonl/x.jsonl"], "d.jsonl is a file, not a directory")
    refused(capsys, ["synth", "--n", "3", "--out", "d.jsonl"], "--out d.jsonl already exists", "never overwrites")
    refused(capsys, ["synth", "--n", "0", "--out", "new.jsonl"], "--n must be at least 1")
    assert tree(tmp_path) == before  # d.jsonl unchanged, no temporary file left


def test_synth_refuses_more_than_its_documented_maximum_at_once(tmp_path):
    from medtee.cli import SYNTH_MAX_N

    res = run_medtee("synth", "--n", "100000000000", "--out", "huge.jsonl", cwd=tmp_path, timeout=30)
    assert res.returncode == 2 and f"--n must be at most {SYNTH_MAX_N}" in res.stderr
    assert "Traceback" not in res.stderr and list(tmp_path.iterdir()) == []
    assert str(SYNTH_MAX_N) in run_medtee("synth", "--help", cwd=tmp_path).stdout


def test_synth_checks_free_space_first(tmp_path, capsys, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    refused(capsys, ["synth", "--n", "1000", "--out", "x.jsonl"], "MB free", "lower --n")
    assert list(tmp_path.iterdir()) == []


def test_synth_writes_what_generate_dialogues_gives(tmp_path, capsys):
    from medtee.data.synthetic import generate_dialogues

    assert main(["synth", "--n", "7", "--seed", "2", "--out", "new.jsonl"]) == 0
    lines = (tmp_path / "new.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == generate_dialogues(7, seed=2)
    assert [p.name for p in tmp_path.iterdir()] == ["new.jsonl"]


# seal / keys

def test_seal_bounds_canaries_before_reading_anything(tmp_path, dialogues):
    before = tree(tmp_path)
    res = run_medtee("seal", "d.jsonl", "--out", "s3", "--canaries", "100000", cwd=tmp_path, timeout=60)
    assert res.returncode == 2 and "--canaries must be at most 1000 (got 100000)" in res.stderr, res.stderr
    res = run_medtee("seal", "d.jsonl", "--out", "s3", "--canaries", "10", "--canary-repeats", "1,100000",
                     cwd=tmp_path, timeout=60)
    assert res.returncode == 2 and "adds 1000010 canary records; at most 100000" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr and tree(tmp_path) == before  # no sealed dir, no broker store


def test_plan_canaries_keeps_its_bounds():
    from medtee.audit.canaries import MAX_CANARIES_PER_REPEAT, plan_canaries

    with pytest.raises(ValueError, match="at most"):
        plan_canaries(MAX_CANARIES_PER_REPEAT + 1, real_records=10)
    with pytest.raises(ValueError, match="canary records"):
        plan_canaries(2, (1, 10**6), real_records=10)


def test_seal_and_keys_name_a_file_given_as_a_directory(tmp_path, capsys, dialogues):
    before = tree(tmp_path)
    refused(capsys, ["seal", "d.jsonl", "--out", "s10", "--broker-dir", "d.jsonl"], "--broker-dir d.jsonl is a file",
            "name a directory")
    refused(capsys, ["keys", "new", "--out", "d.jsonl", "--name", "x"], "--out d.jsonl is a file", "name a directory")
    refused(capsys, ["keys", "new", "--out", "d.jsonl/keys", "--name", "x"], "inside d.jsonl, which is a file")
    refused(capsys, ["keys", "rotate", "--broker-dir", "d.jsonl"], "--broker-dir d.jsonl is a file")
    refused(capsys, ["seal", "d.jsonl", "--out", "s10", "--rows-per-shard", "100000000000"],
            "--rows-per-shard must be 1-10000000")
    assert tree(tmp_path) == before


def test_store_alias_and_both_scheme_spellings(tmp_path, capsys, dialogues):
    assert main(["seal", "d.jsonl", "--out", "s", "--store", "b", "--scheme", "hpke_x25519"]) == 0
    assert "wrapped with hpke-x25519" in capsys.readouterr().out and (tmp_path / "b" / "broker.key").is_file()
    assert main(["keys", "rotate", "s", "--store", "b", "--scheme", "hpke_mlkem768_x25519"]) == 0
    assert "rotated the broker key in b" in capsys.readouterr().out
    assert main(["keys", "new", "--out", "k", "--scheme", "hpke_x25519"]) == 0
    assert "scheme hpke-x25519" in capsys.readouterr().out
    assert main(["keys", "new", "--out", "k", "--name", "old", "--scheme", "hpke-x25519"]) == 0
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(["keys", "new", "--out", "k", "--name", "y", "--scheme", "hpke_x448"])
    assert exit_.value.code == 2
    assert "unknown scheme 'hpke_x448'; use hpke_x25519 or hpke_mlkem768_x25519" in capsys.readouterr().err


# adapter open

@pytest.fixture
def adapter(tmp_path) -> Path:
    """A run directory with an adapter encrypted to keys/owner.pub (and an adapter.sealed beside it)."""
    from medtee.crypto import hpke
    from medtee.crypto.blob import seal_blob
    from medtee.crypto.stream import encrypt
    from medtee.training.output import ADAPTER_INFO

    scheme, public = hpke.load_public_key(hpke.write_keypair(tmp_path / "keys", "owner"))
    run = tmp_path / "run"
    run.mkdir()
    (run / "adapter.safetensors.enc").write_bytes(seal_blob(b"weights", public, scheme=scheme, info=ADAPTER_INFO))
    (run / "adapter_config.json").write_text('{"r": 4}')
    (run / "adapter.sealed").write_bytes(encrypt(b"weights", bytes(32)))
    return run


def test_adapter_open_never_overwrites_a_decrypted_adapter(tmp_path, capsys, adapter):
    assert main(["adapter", "open", "run/adapter.safetensors.enc", "--key", "keys/owner.key", "--out", "out"]) == 0
    assert (tmp_path / "out" / "adapter_model.safetensors").read_bytes() == b"weights"
    capsys.readouterr()
    (tmp_path / "out" / "adapter_model.safetensors").write_bytes(b"the recipient's earlier adapter")
    before = tree(tmp_path)
    refused(capsys, ["adapter", "open", "run/adapter.safetensors.enc", "--key", "keys/owner.key", "--out", "out"],
            "--out out is not empty", "adapter_model.safetensors", "never overwrites")
    assert tree(tmp_path) == before
    (tmp_path / "empty").mkdir()
    assert main(["adapter", "open", "run/adapter.safetensors.enc", "--key", "keys/owner.key", "--out", "empty"]) == 0
    assert sorted(p.name for p in (tmp_path / "empty").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


def test_adapter_open_says_what_the_wrong_file_is(tmp_path, capsys, adapter):
    before = tree(tmp_path)
    key = ["--key", "keys/owner.key", "--out", "out"]
    refused(capsys, ["adapter", "open", "run", *key], "run is a directory", "run/adapter.safetensors.enc")
    refused(capsys, ["adapter", "open", "run/adapter.sealed", *key], "sealed to a dataset's release",
            "pass adapter.safetensors.enc")
    refused(capsys, ["adapter", "open", "keys/owner.pub", *key], "is not an encrypted adapter",
            "adapter.safetensors.enc")
    refused(capsys, ["adapter", "open", "run/adapter.safetensors.enc", "--key", "keys", "--out", "out"],
            "--key keys is a directory", "NAME.key")
    refused(capsys, ["adapter", "open", "missing.enc", *key], "missing.enc: no such file")
    assert tree(tmp_path) == before and not (tmp_path / "out").exists()


# image measure

def test_image_measure_says_a_negative_vcpu_count_is_too_small(tmp_path, capsys):
    for name in ("ovmf.fd", "vmlinuz", "initrd"):
        (tmp_path / name).write_bytes(b"\0" * 16)
    image = ["image", "measure", "--ovmf", "ovmf.fd", "--kernel", "vmlinuz", "--initrd", "initrd", "--append", "",
             "--vcpu-type", "EPYC-v4"]
    refused(capsys, [*image, "--vcpus", "-8"], "--vcpus must be at least 1 (got -8)")
    refused(capsys, [*image, "--vcpus", "99999999"], "--vcpus must be at most 4096")
    refused(capsys, [*image, "--vcpus", "four"], "--vcpus 'four' is not a whole number")


def test_the_adapter_header_is_the_sealed_blob_header():
    from medtee.crypto import hpke
    from medtee.crypto.blob import seal_blob
    from medtee.training.output import ADAPTER_INFO, SEALED_BLOB_HEADER

    for scheme in hpke.Scheme:
        _, public = hpke.generate_keypair(scheme)
        assert seal_blob(b"w", public, scheme=scheme, info=ADAPTER_INFO).startswith(SEALED_BLOB_HEADER)


@pytest.mark.parametrize("special", ["fifo", "/dev/zero"])
def test_evidence_and_owner_keys_that_are_no_regular_file_are_refused_without_reading(tmp_path, capsys, dialogues,
                                                                                       special):
    """A FIFO hung `attest verify` and `dataset inspect --owner-key`; /dev/zero was read until memory ran out."""
    path = "/dev/zero"
    if special == "fifo":
        path = "ff"
        os.mkfifo(path)
    for flags in (["--snp-report", path], ["--snp-report", path, "--snp-cert", path],
                  ["--gpu-report", path, "--gpu-certs", path]):
        refused(capsys, ["attest", "verify", *flags, "--policy", "authenticity"],
                f"attest verify: {path} is not a regular file")
    assert main(["seal", "d.jsonl", "--out", "sealed"]) == 0
    capsys.readouterr()
    refused(capsys, ["dataset", "inspect", "--owner-key", path, "sealed"], f"owner public key {path} is not a regular "
            "file", "pass the data owner's owner-signing.pub")


def test_a_damaged_registration_is_one_line_in_every_command_that_reads_it(tmp_path, capsys, dialogues):
    assert main(["seal", "d.jsonl", "--out", "sealed", "--dataset-id", "ds"]) == 0
    capsys.readouterr()
    registration = tmp_path / ".medtee/broker/datasets/ds.json"
    for damage, says in (("[]", "is not a registration"), ("{", "is not valid JSON"), (b"\xff", "is not valid JSON"),
                         ("directory", "is not a regular file")):
        registration.unlink() if registration.is_file() else registration.rmdir()
        if damage == "directory":
            registration.mkdir()
        else:
            registration.write_bytes(damage if isinstance(damage, bytes) else damage.encode())
        for argv in (["broker", "policy", "set", "ds", "simulated"], ["keys", "rotate", "sealed"]):
            refused(capsys, argv, f"{registration.relative_to(tmp_path)} {says}", "re-register the dataset")
        assert main(["broker", "audit", "budget"]) == 2  # each readable dataset is still printed
        assert capsys.readouterr().err.startswith(f"medtee: ds: {registration.relative_to(tmp_path)} {says}")


def test_a_missing_owner_key_is_not_replaced_by_a_new_identity(tmp_path, capsys, dialogues):
    """The new key used to be written beside the old public key, and rotation re-signed datasets with it."""
    assert main(["seal", "d.jsonl", "--out", "sealed"]) == 0
    capsys.readouterr()
    (tmp_path / ".medtee/broker/owner-signing.key").unlink()
    before = tree(tmp_path)
    for argv in (["seal", "d.jsonl", "--out", "s2", "--dataset-id", "other"], ["keys", "rotate", "sealed"]):
        refused(capsys, argv, "owner-signing.key is missing but", "restore it from its backup")
    assert tree(tmp_path) == before
    (tmp_path / ".medtee/broker/owner-signing.key").write_text("")  # damaged
    (tmp_path / ".medtee/broker/owner-signing.key").chmod(0o600)
    refused(capsys, ["keys", "rotate", "sealed"], "owner-signing.key is not an unencrypted PEM private key")


@pytest.mark.parametrize("flag", ["--nonce-ttl", "--idle-timeout", "--body-timeout"])
@pytest.mark.parametrize("value", ["nan", "inf", "0"])
def test_broker_serve_refuses_a_time_that_is_not_a_positive_finite_number(tmp_path, capsys, flag, value):
    """NaN passed the `<= 0` check: a broker with --nonce-ttl nan dropped every nonce at its next prune."""
    with pytest.raises(SystemExit) as stopped:
        main(["broker", "serve", flag, value, "--broker-dir", "b"])
    assert stopped.value.code == 2 and f"must be a positive finite number (got {value})" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("text", ["", "\n", "# a comment only\n", "{}\n"])
def test_an_empty_policy_file_is_refused(tmp_path, capsys, dialogues, text):
    """It was stored, and `policy set` applied it: the schema's defaults, a policy nobody wrote."""
    assert main(["seal", "d.jsonl", "--out", "sealed"]) == 0
    capsys.readouterr()
    (tmp_path / "e.yaml").write_text(text)
    before = tree(tmp_path)
    refused(capsys, ["broker", "policy", "add", "mine", "e.yaml"], "attestation policy e.yaml: is empty",
            "medtee broker policy show snp_h200")
    refused(capsys, ["seal", "d.jsonl", "--out", "s2", "--policy", "e.yaml"], "is empty")
    assert tree(tmp_path) == before


def test_a_missing_broker_key_beside_its_public_key_is_named(tmp_path, capsys, dialogues):
    assert main(["seal", "d.jsonl", "--out", "sealed"]) == 0
    capsys.readouterr()
    (tmp_path / ".medtee/broker/broker.key").unlink()
    before = tree(tmp_path)
    refused(capsys, ["seal", "d.jsonl", "--out", "s2", "--dataset-id", "other"], "broker.key is missing but",
            "restore it from its backup", code=1)
    assert tree(tmp_path) == before


def test_a_key_that_is_no_file_and_an_out_that_is_a_dangling_link_are_named(tmp_path, capsys):
    os.mkfifo("ff")
    (tmp_path / "x.enc").write_bytes(b"")
    for key in ("ff", "/dev/zero"):
        refused(capsys, ["adapter", "open", "x.enc", "--key", key, "--out", "o"], f"--key {key} is not a regular file")
    (tmp_path / "dang").symlink_to(tmp_path / "nowhere" / "x")
    refused(capsys, ["keys", "new", "--out", "dang", "--name", "k"], "--out dang is a link to nothing")
    assert not (tmp_path / "nowhere").exists() and not (tmp_path / "o").exists()
