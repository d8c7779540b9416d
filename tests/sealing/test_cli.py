"""The data owner's commands, in process: seal, data inspect, keys new/rotate, broker audit/policy."""

from __future__ import annotations

from medtee.cli import main


def test_seal_inspect_rotate_audit(jsonl, tmp_path, capsys):
    printed = []
    assert main(["seal", str(jsonl), "--out", "ds", "--dataset-id", "cli-ds", "--rows-per-shard", "8"]) == 0
    out, err = capsys.readouterr()
    printed += [out, err]
    assert "sealed 30 records" in out and "part-00003.parquet" in out and "SIMULATED" in err
    assert (tmp_path / ".medtee" / "broker" / "broker.key").exists()
    assert main(["dataset", "inspect", "ds", "--owner-key", ".medtee/broker/owner-signing.pub"]) == 0
    out, _ = capsys.readouterr()
    printed.append(out)
    assert "signature      OK, by the trusted owner key" in out and "all 4 shards" in out
    assert main(["keys", "rotate", "ds", "--scheme", "hpke-x25519"]) == 0
    assert main(["dataset", "inspect", "ds"]) == 0
    assert "wrapped with hpke-x25519" in capsys.readouterr().out
    assert main(["broker", "policy", "set", "cli-ds", "snp_h200"]) == 0
    assert "release policy 'snp_h200' pins no launch measurement, so the broker releases the key to no one until " \
           "one is pinned: compute your image's (`medtee image measure" in capsys.readouterr().err
    assert main(["broker", "audit", "verify"]) == 0
    out, _ = capsys.readouterr()
    assert "audit log OK: 3 entries" in out
    assert not any("PHI-marker" in text or "chest pain" in text for text in printed + [out])


def test_bad_input_exit_codes_name_the_problem(jsonl, tmp_path, capsys):
    (tmp_path / "bad.jsonl").write_text('{"id": "a", "messages": [{"role": "nurse", "content": "PHI-marker"}]}\n')
    assert main(["seal", "bad.jsonl", "--out", "ds"]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:1: message 0: 'role' must be one of" in err and "PHI-marker" not in err
    assert not (tmp_path / "ds").exists()
    assert main(["seal", str(jsonl), "--out", "ds", "--policy", "no-such-policy"]) == 2
    assert "no attestation policy 'no-such-policy'" in capsys.readouterr().err
    assert main(["seal", "missing.jsonl", "--out", "ds"]) == 2
    assert main(["seal", str(jsonl), "--out", "ds"]) == 0
    assert main(["seal", str(jsonl), "--out", "ds"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["seal", str(jsonl), "--out", "ds-prod", "--policy", "snp_h100"]) == 0
    assert "release policy 'snp_h100' pins no launch measurement" in capsys.readouterr().err
    assert main(["seal", str(jsonl), "--out", "ds2", "--scheme", "hpke-x25519"]) == 2
    assert "already uses hpke-mlkem768-x25519" in capsys.readouterr().err
    (tmp_path / "ds" / "part-00000.parquet").write_bytes(b"PAR1")
    assert main(["dataset", "inspect", "ds"]) == 2
    assert "part-00000.parquet" in capsys.readouterr().err


def test_keys_new(tmp_path, capsys):
    assert main(["keys", "new", "--out", str(tmp_path / "k"), "--name", "model-owner", "--scheme", "hpke-x25519"]) == 0
    assert (tmp_path / "k" / "model-owner.key").stat().st_mode & 0o777 == 0o600
    assert "hpke-x25519" in capsys.readouterr().out
    assert main(["keys", "new", "--out", str(tmp_path / "k"), "--name", "model-owner"]) == 2
    assert "never overwritten" in capsys.readouterr().err


def test_audit_verify_detects_tampering(jsonl, tmp_path, capsys):
    assert main(["seal", str(jsonl), "--out", "ds"]) == 0
    log = tmp_path / ".medtee" / "broker" / "audit.log"
    log.write_text(log.read_text().replace('"register"', '"deregister"'))
    assert main(["broker", "audit", "verify"]) == 1
    assert "altered" in capsys.readouterr().err
