"""The audit log's high-water mark (`audit.log.mark`) against the ways a log can be rolled back or forged without
breaking its chain: a copy put back while the broker decides, a mark that cannot be written, a line forged at the
mark's offset, a lost final newline, a log rewritten with other spacing, and marks that are not marks."""

from __future__ import annotations

import errno
import json
import logging

import pytest

from medtee.broker import audit, budget
from medtee.broker.audit import AuditLogDamaged
from medtee.broker.service import EmbeddedBroker
from medtee.cli import main

from .test_dp_budget import dp_recipe
from .test_release_rules import attempt, rules_policy


@pytest.fixture
def budgeted(sealed, broker, tmp_path):
    """A broker whose dataset has spent epsilon 4 of 5, the log before that release, and the manifest."""
    _, manifest, _, _ = sealed
    rules_policy(tmp_path, broker, "budgeted", require_dp=True, dp_budget={"epsilon": 5})
    older = broker.audit.path.read_bytes()
    assert attempt(broker, manifest, dp_recipe(4)) == "released"
    return broker, manifest, older


def test_a_copy_put_back_while_the_broker_decides_records_nothing(budgeted, monkeypatch):
    """`cp older audit.log` takes no lock: landing between the broker's check and its write, the new entry would
    chain onto the older copy and the mark would follow it. The broker sees the log change and records nothing."""
    broker, manifest, older = budgeted
    refusal = budget.refusal

    def put_back(*args, **kwargs):
        broker.audit.path.write_bytes(older)  # the same file, as cp writes it
        return refusal(*args, **kwargs)

    monkeypatch.setattr(budget, "refusal", put_back)
    with pytest.raises(AuditLogDamaged, match="changed while the broker decided .* nothing was recorded"):
        attempt(broker, manifest, dp_recipe(1))
    monkeypatch.setattr(budget, "refusal", refusal)
    assert broker.audit.path.read_bytes() == older
    with pytest.raises(AuditLogDamaged, match="does not hold entry .* restored from an older copy"):
        EmbeddedBroker(broker.store_dir)


def test_a_mark_that_cannot_be_written_returns_no_decision(budgeted, monkeypatch):
    """The entry is in the log (so its spend counts) but the decision is not returned: a later rollback to the
    stale mark can only forget a release whose key nobody received."""
    broker, manifest, _ = budgeted

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(audit, "write_atomic", full)
    with pytest.raises(AuditLogDamaged, match=r"recorded but the high-water mark could not be updated \(No space"):
        attempt(broker, manifest, dp_recipe(0.5))
    monkeypatch.undo()
    assert broker.privacy_spent("test-ds")[2].epsilon == 4.5  # counted, though not returned
    assert attempt(broker, manifest, dp_recipe(0.5)) == "released"
    assert attempt(broker, manifest, dp_recipe(0.5)) == ["broker.dp_budget"]


def test_a_line_forged_at_the_marks_offset_is_refused(budgeted):
    """The marked entry must be the mark's entry, hash and all; and a broker reading the log follows its chain."""
    broker, _, older = budgeted
    log, mark = broker.audit.path, json.loads(audit.mark_path(broker.audit.path).read_text())
    stub = json.dumps({"seq": mark["seq"], "hash": mark["hash"], "pad": ""})
    forged = older + (stub[:-2] + "x" * (mark["end"] - len(older) - len(stub) - 1) + '"}\n').encode()
    assert len(forged) == mark["end"]
    log.write_bytes(forged)
    with pytest.raises(AuditLogDamaged, match="does not hold entry"):
        EmbeddedBroker(broker.store_dir)
    lines = (older + b"").splitlines(keepends=True)
    log.write_bytes(b"".join(lines[:1] + lines[2:]))  # an entry cut out of the middle: the chain no longer follows
    audit.mark_path(log).unlink()
    with pytest.raises(AuditLogDamaged, match="does not follow the one before it"):
        EmbeddedBroker(broker.store_dir).audit.append("x")


def test_a_lost_final_newline_keeps_the_marked_entry_and_a_torn_one_is_refused(broker):
    broker.audit.append("a")
    broker.audit.append("b")
    log = broker.audit.path
    whole = log.read_bytes()
    log.write_bytes(whole[:-1])  # an editor that strips the final newline: the entry is whole, and kept
    assert broker.audit.append("c")["seq"] == 2 and log.read_bytes().startswith(whole)
    whole = log.read_bytes()
    log.write_bytes(whole[:-2])  # the marked entry torn: not a whole entry, so not taken for one
    with pytest.raises(AuditLogDamaged, match="does not hold entry 2"):
        broker.audit.append("d")
    assert log.read_bytes() == whole[:-2]  # the broker removed nothing


def test_a_log_rewritten_with_other_spacing_still_holds_its_mark(broker, capsys):
    """`jq -c` keeps every entry and the chain, not the offsets: the mark's entry is found by seq and hash."""
    broker.audit.append("a")
    broker.audit.append("b")
    log = broker.audit.path
    log.write_bytes(b"".join(json.dumps(json.loads(line), separators=(",", ":"), sort_keys=True).encode() + b"\n"
                             for line in log.read_bytes().splitlines()))
    assert main(["broker", "audit", "verify", "--broker-dir", str(broker.store_dir)]) == 0
    assert EmbeddedBroker(broker.store_dir).audit.append("c")["seq"] == 2
    assert json.loads(audit.mark_path(log).read_text())["end"] == log.stat().st_size


def test_marks_that_are_not_marks_name_themselves(broker, capsys, monkeypatch):
    broker.audit.append("a")
    mark = audit.mark_path(broker.audit.path)
    store = str(broker.store_dir)
    mark.unlink()
    mark.mkdir()
    for setup in ("directory", "dangling link"):
        with pytest.raises(AuditLogDamaged, match="audit.log.mark is not an audit high-water mark; restore it"):
            EmbeddedBroker(broker.store_dir)
        assert main(["broker", "serve", "--port", "0", "--broker-dir", store]) == 1
        err = capsys.readouterr().err
        assert "is not an audit high-water mark" in err and "restore" not in err.split("next append")[1]
        mark.rmdir() if mark.is_dir() else None
        if setup == "directory":
            mark.symlink_to(broker.store_dir / "nowhere")
    mark.unlink()

    def unreadable(*args):
        raise PermissionError(errno.EACCES, "Permission denied")

    broker.audit.append("b")
    monkeypatch.setattr(audit, "read_regular", unreadable)
    with pytest.raises(AuditLogDamaged, match=r"cannot read .*audit.log.mark \(Permission denied\); fix its"):
        EmbeddedBroker(broker.store_dir)


def test_serve_refuses_a_store_whose_log_was_removed(broker, capsys):
    broker.audit.append("a")
    broker.audit.path.unlink()
    assert main(["broker", "serve", "--port", "0", "--broker-dir", str(broker.store_dir)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "audit.log does not exist, but its high-water mark" in err


def test_a_removed_mark_is_recorded_in_the_log(broker, caplog):
    """Removing the mark accepts whatever the log holds: the next append says so, in the log and as a warning."""
    broker.audit.append("a")
    audit.mark_path(broker.audit.path).unlink()
    with caplog.at_level(logging.WARNING, logger="medtee.broker.audit"):
        broker.audit.append("b")
    assert [e["event"] for e in broker.audit.entries()] == ["a", "mark-start", "b"]
    assert "has no high-water mark: its 1 entries are taken as whole" in caplog.text
    assert main(["broker", "audit", "verify", "--broker-dir", str(broker.store_dir)]) == 0


def test_a_policy_change_on_a_rolled_back_log_changes_nothing(budgeted, capsys):
    broker, _, older = budgeted
    registration = broker.store_dir / "datasets" / "test-ds.json"
    before = registration.read_bytes()
    broker.audit.path.write_bytes(older)
    assert main(["broker", "policy", "set", "test-ds", "simulated", "--broker-dir", str(broker.store_dir)]) == 1
    assert "does not hold entry" in capsys.readouterr().err
    with pytest.raises(AuditLogDamaged):
        broker.set_policy("test-ds", "simulated")
    assert registration.read_bytes() == before


def test_a_copy_padded_to_the_same_size_put_back_while_deciding_is_seen(budgeted, monkeypatch):
    """Not only the size: the last entry the decision was made on must still be the log's last."""
    broker, manifest, older = budgeted
    size = broker.audit.path.stat().st_size
    lines = older.splitlines(keepends=True)
    padded = b"".join(lines[:-1]) + lines[-1][:1] + b" " * (size - len(older)) + lines[-1][1:]  # same entries
    assert len(padded) == size
    refusal = budget.refusal

    def put_back(*args, **kwargs):
        broker.audit.path.write_bytes(padded)
        return refusal(*args, **kwargs)

    monkeypatch.setattr(budget, "refusal", put_back)
    with pytest.raises(AuditLogDamaged, match="changed while the broker decided"):
        attempt(broker, manifest, dp_recipe(1))
    monkeypatch.undo()
    with pytest.raises(AuditLogDamaged, match="does not hold entry"):
        EmbeddedBroker(broker.store_dir)


@pytest.mark.parametrize("spend", [0.0, 0])  # 0 changes the line's length: a running broker reads the log again
def test_an_entry_edited_in_place_is_refused_by_a_broker_reading_it(budgeted, spend):
    """A release's dp_spend lowered, its `hash` field kept: a broker checks each entry it reads hashes to itself.
    (A running broker reads an entry once: an edit of the same length is found by `audit verify` and `serve`.)"""
    broker, manifest, _ = budgeted
    assert attempt(broker, manifest, dp_recipe(0.5)) == "released"  # the epsilon-4 release is now mid-log
    log = broker.audit.path
    entries = [json.loads(line) for line in log.read_bytes().splitlines()]
    for e in entries:
        if e["event"] == "release" and e["dp_spend"]["epsilon"] == 4:
            e["dp_spend"]["epsilon"] = spend
    log.write_bytes(b"".join(json.dumps(e, sort_keys=True).encode() + b"\n" for e in entries))
    for reader in (EmbeddedBroker(broker.store_dir), *([broker] if type(spend) is int else [])):
        with pytest.raises(AuditLogDamaged, match="was altered after it was written"):
            attempt(reader, manifest, dp_recipe(4))


def test_mark_start_is_recorded_once_even_while_the_mark_cannot_be_written(broker, monkeypatch):
    broker.audit.append("a")
    audit.mark_path(broker.audit.path).unlink()

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(audit, "write_atomic", full)
    for _ in range(3):
        with pytest.raises(AuditLogDamaged, match="high-water mark could not be updated"):
            broker.audit.append("b")
    monkeypatch.undo()
    broker.audit.append("b")
    assert [e["event"] for e in broker.audit.entries()] == ["a", "mark-start", "b"]


def test_a_log_that_is_no_file_is_refused_in_one_line(broker, capsys):
    broker.audit.append("a")
    broker.audit.path.unlink()
    broker.audit.path.mkdir()
    store = str(broker.store_dir)
    for argv in (["broker", "audit", "verify", "--broker-dir", store], ["broker", "serve", "--broker-dir", store]):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "audit.log is not a regular file" in err and "Traceback" not in err
    with pytest.raises(AuditLogDamaged, match="is not a regular file .*; restore the audit log there"):
        EmbeddedBroker(broker.store_dir)


def test_every_mark_removal_is_recorded(broker):
    """A copy that ends in a mark-start, put back and its mark removed: the new acceptance is recorded too."""
    broker.audit.append("a")
    audit.mark_path(broker.audit.path).unlink()
    broker.audit.append("b")
    ends_in_mark_start = b"".join(broker.audit.path.read_bytes().splitlines(keepends=True)[:2])
    broker.audit.path.write_bytes(ends_in_mark_start)
    audit.mark_path(broker.audit.path).unlink()
    broker.audit.append("c")
    assert [e["event"] for e in broker.audit.entries()] == ["a", "mark-start", "mark-start", "c"]


def test_a_whole_store_restored_from_an_older_copy_fails_against_an_anchored_head(broker, capsys):
    """Log and mark rolled back together pass `audit verify`; the head anchored outside the store does not."""
    store, log, mark = str(broker.store_dir), broker.audit.path, audit.mark_path(broker.audit.path)
    broker.audit.append("a")
    older = log.read_bytes(), mark.read_bytes()
    broker.audit.append("b")
    assert main(["broker", "audit", "verify", "--broker-dir", store]) == 0
    head = capsys.readouterr().out.split("head ")[1].split()[0]
    assert main(["broker", "audit", "verify", "--broker-dir", store, "--head", head]) == 0
    out = capsys.readouterr().out
    assert f"it holds the anchored head {head} (entry 1), so entries 0-1 are the ones anchored; 0 came after it" in out
    broker.audit.append("c")
    assert main(["broker", "audit", "budget", "--broker-dir", store, "--head", head]) == 0
    capsys.readouterr()
    broker.close()
    log.write_bytes(older[0]), mark.write_bytes(older[1])
    assert main(["broker", "audit", "verify", "--broker-dir", store]) == 0  # the mark alone cannot see it
    capsys.readouterr()
    for action in ("verify", "budget"):
        assert main(["broker", "audit", action, "--broker-dir", store, "--head", head]) == 1
        err = capsys.readouterr().err
        assert f"FAILED the anchored head: none of its 1 entries has hash {head}" in err and "restore" in err
    assert main(["broker", "audit", "verify", "--broker-dir", store, "--head", "not-a-hash"]) == 2
    assert "--head must be the 64 lowercase hex digits" in capsys.readouterr().err
