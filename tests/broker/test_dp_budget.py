"""A dataset's differential-privacy budget across its key releases (`recipe.dp_budget`): the broker records what each
release may spend in its audit log and refuses one that would take the dataset's total over the owner's bound."""

from __future__ import annotations

import hashlib
import json
import threading

import pytest

from medtee.broker import budget
from medtee.broker.protocol import KeyReleaseDenied, canonical_json
from medtee.broker.service import EmbeddedBroker
from medtee.cli import main
from medtee.crypto.hpke import EphemeralKey

from .conftest import simulated_evidence
from .test_release_rules import attempt, recipe_doc, rules_policy


def dp_recipe(epsilon: float, delta: float = 1e-5, **changes) -> dict:
    doc = recipe_doc(**{"privacy.dp.enabled": True, **changes})
    doc["privacy"]["dp"].update(target_epsilon=epsilon, target_delta=delta)
    return doc


def entries(broker, event: str) -> list[dict]:
    return [e for e in broker.audit.entries() if e["event"] == event]


def budget_digest(recipe: dict) -> str:
    return hashlib.sha256(canonical_json(recipe)).hexdigest()


def raise_release(broker, manifest, recipe):
    """One release for `recipe` (its real digest); KeyReleaseDenied when refused."""
    digest = budget_digest(recipe)
    nonce, eph = broker.challenge("test-ds"), EphemeralKey.generate()
    broker.release(dataset_id="test-ds", nonce=nonce, evidence=simulated_evidence(digest)(nonce, eph.public_bytes),
                   ephemeral_public_key=eph.public_bytes, recipe_digest=digest, manifest_digest=manifest.digest(),
                   recipe=recipe)


def test_releases_stop_when_the_dataset_epsilon_budget_is_spent(sealed, broker, tmp_path):
    _, manifest, _, _ = sealed
    rules_policy(tmp_path, broker, "budgeted", require_dp=True, dp_budget={"epsilon": 10})
    assert attempt(broker, manifest, dp_recipe(4)) == "released"
    assert attempt(broker, manifest, dp_recipe(4)) == "released"
    assert attempt(broker, manifest, dp_recipe(4)) == ["broker.dp_budget"]
    assert attempt(broker, manifest, dp_recipe(2)) == "released"  # exactly the budget
    assert attempt(broker, manifest, dp_recipe(0.5)) == ["broker.dp_budget"]
    assert attempt(broker, manifest, dp_recipe(1, mode="eval")) == "released"  # trains nothing: spends nothing
    assert [e["dp_spend"] for e in entries(broker, "release")] == [
        {"epsilon": 4.0, "delta": 1e-5}, {"epsilon": 4.0, "delta": 1e-5}, {"epsilon": 2.0, "delta": 1e-5},
        {"epsilon": 0.0, "delta": 0.0}]
    assert [e["failed"] for e in entries(broker, "deny")] == [["broker.dp_budget"]] * 2
    spent = broker.privacy_spent("test-ds")[2]
    assert (spent.releases, spent.epsilon, spent.unbounded_seq) == (4, 10.0, None)


def test_the_refusal_names_the_sums_and_the_bound(sealed, broker, tmp_path):
    _, manifest, _, _ = sealed
    rules_policy(tmp_path, broker, "budgeted", require_dp=True, dp_budget={"epsilon": 3, "delta": 2e-5})
    assert attempt(broker, manifest, dp_recipe(1, 1e-5)) == "released"
    with pytest.raises(KeyReleaseDenied) as denied:
        raise_release(broker, manifest, dp_recipe(1, 2e-5))
    text = denied.value.verdict.explain()
    assert "within epsilon <= 3 and delta <= 2e-05 (recipe.dp_budget)" in text
    assert "delta 1e-05 spent + 2e-05 = 3e-05 > 2e-05" in text and "epsilon" not in text.split("got", 1)[1]


def test_decimal_epsilons_sum_to_the_budget(sealed, broker, tmp_path):
    _, manifest, _, _ = sealed
    rules_policy(tmp_path, broker, "budgeted", require_dp=True, dp_budget={"epsilon": 0.3})
    assert [attempt(broker, manifest, dp_recipe(0.1)) for _ in range(4)] == ["released"] * 3 + [["broker.dp_budget"]]


def test_a_release_without_dp_leaves_the_budget_nothing_to_bound(sealed, broker, tmp_path):
    """A key once released to a run without DP (before the owner set a budget) makes the loss unbounded for good."""
    _, manifest, _, _ = sealed
    rules_policy(tmp_path, broker, "open", modes=["train", "eval", "sweep"])
    assert attempt(broker, manifest, recipe_doc()) == "released"  # DP off
    assert entries(broker, "release")[-1]["dp_spend"] == "unbounded"
    seq = entries(broker, "release")[-1]["seq"]
    rules_policy(tmp_path, broker, "budgeted", require_dp=True, dp_budget={"epsilon": 10})
    with pytest.raises(KeyReleaseDenied, match="dp_budget") as denied:
        raise_release(broker, manifest, dp_recipe(1))
    assert f"release seq {seq} of this dataset trained without DP" in denied.value.verdict.explain()
    assert "seal the dialogues again as a new dataset" in denied.value.verdict.explain()


@pytest.mark.parametrize("recipe, why", [
    (dict(dp_recipe(1), mode="sweep"), "medtee sweeps only without DP"),
    (recipe_doc(), "DP off"),
    (None, "no recipe sent"),
])
def test_what_spends_an_unbounded_amount(recipe, why):
    digest = budget_digest(recipe) if recipe is not None else "ab" * 32
    assert budget.spend(recipe, digest) == budget.UNBOUNDED, why


def test_a_spend_counts_only_from_the_recipe_its_digest_covers():
    recipe = dp_recipe(1)
    assert budget.spend(recipe, budget_digest(recipe)) == {"epsilon": 1.0, "delta": 1e-5}
    assert budget.spend(recipe, budget_digest(dp_recipe(2))) == budget.UNBOUNDED
    odd = dp_recipe(1)
    odd["privacy"]["dp"]["target_epsilon"] = True  # not a number
    assert budget.spend(odd, budget_digest(odd)) == budget.UNBOUNDED
    assert budget.spent([{"event": "release", "dataset_id": "d", "seq": 3}], "d").unbounded_seq == 3  # older entries


@pytest.mark.parametrize("recipe", [
    dp_recipe(5, mode="eval"), dp_recipe(5, mode="generate"), dp_recipe(5, trainer={"validate_only": True}),
    recipe_doc(trainer={"validate_only": True, "resume_from": "sha256:" + "22" * 32}),  # DP off: still trains nothing
])
def test_runs_that_train_nothing_spend_nothing(recipe):
    assert budget.spend(recipe, budget_digest(recipe)) == {"epsilon": 0.0, "delta": 0.0}
    assert budget.spend(dp_recipe(5, trainer={"validate_only": "true"}), budget_digest(
        dp_recipe(5, trainer={"validate_only": "true"}))) == {"epsilon": 5.0, "delta": 1e-5}  # only a real true


def test_amounts_past_the_largest_float_are_refused_not_a_crash(sealed, broker, tmp_path):
    _, manifest, _, _ = sealed
    rules_policy(tmp_path, broker, "delta-only", require_dp=True, dp_budget={"delta": 1e-3})
    assert [attempt(broker, manifest, dp_recipe(1e308)) for _ in range(3)] == ["released"] * 3  # sum > max float
    assert budget.spent(broker.audit.entries(), "test-ds").describe().startswith("epsilon inf")
    huge = dp_recipe(1)
    huge["privacy"]["dp"]["target_epsilon"] = 10 ** 400
    assert budget.spend(huge, budget_digest(huge)) == budget.UNBOUNDED


def test_a_budgeted_dataset_keeps_one_split(sealed, broker, tmp_path):
    """eval, generate and validate-only runs spend nothing because they read held-out dialogues only: another split
    (a larger data.val_fraction, another data.seed) would hold out dialogues earlier runs trained on."""
    _, manifest, _, _ = sealed
    rules_policy(tmp_path, broker, "budgeted", require_dp=True, dp_budget={"epsilon": 10})
    split = {"seed": 0, "val_fraction": 0.1}
    assert attempt(broker, manifest, dp_recipe(4, data=dict(split))) == "released"
    assert entries(broker, "release")[-1]["split"] == split
    for other in ({"seed": 0, "val_fraction": 0.99}, {"seed": 7, "val_fraction": 0.1}):
        with pytest.raises(KeyReleaseDenied) as denied:
            raise_release(broker, manifest, dp_recipe(0, mode="generate", data=other))
        text = denied.value.verdict.explain()
        assert "keep the one of release seq" in text and "data.seed=0 data.val_fraction=0.1; set them so" in text
    assert attempt(broker, manifest, dp_recipe(0, mode="eval", data=dict(split))) == "released"
    assert attempt(broker, manifest, dp_recipe(4, data={"seed": 0, "val_fraction": 0.1})) == "released"


def test_a_refused_resume_says_what_it_is_charged_and_how_the_owner_admits_it(sealed, broker, tmp_path):
    _, manifest, _, _ = sealed
    rules_policy(tmp_path, broker, "budgeted", require_dp=True, dp_budget={"epsilon": 8})
    assert attempt(broker, manifest, dp_recipe(8)) == "released"
    with pytest.raises(KeyReleaseDenied) as denied:
        raise_release(broker, manifest, dp_recipe(8, trainer={"resume_from": "sha256:" + "33" * 32}))
    text = denied.value.verdict.explain()
    assert "epsilon 8 spent + 8 = 16 > 8" in text
    assert "a resumed run is charged its whole target again" in text and "raises recipe.dp_budget" in text
    with pytest.raises(KeyReleaseDenied) as fresh:
        raise_release(broker, manifest, dp_recipe(8))
    assert "resumed" not in fresh.value.verdict.explain()


def test_concurrent_releases_cannot_both_take_the_last_of_the_budget(sealed, broker, tmp_path):
    """The budget is summed and the release appended under the audit log's lock (here: two brokers on one store)."""
    _, manifest, _, _ = sealed
    rules_policy(tmp_path, broker, "budgeted", require_dp=True, dp_budget={"epsilon": 1})
    brokers = [EmbeddedBroker(broker.store_dir) for _ in range(4)]
    results, start = [], threading.Barrier(len(brokers))

    def one(b):
        start.wait()
        results.append(attempt(b, manifest, dp_recipe(1)))

    threads = [threading.Thread(target=one, args=(b,)) for b in brokers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(map(str, results)) == ["['broker.dp_budget']"] * 3 + ["released"]


@pytest.mark.parametrize("rules, message", [
    ({"dp_budget": {"epsilon": 5}}, "set recipe.require_dp: true with it"),
    ({"require_dp": True, "dp_budget": {"epsilon": -1}}, "recipe.dp_budget.epsilon=-1"),
    ({"require_dp": True, "dp_budget": {"delta": 0}}, "recipe.dp_budget.delta=0"),
])
def test_a_budget_the_broker_cannot_keep_is_refused_when_the_policy_is_read(sealed, broker, tmp_path, rules, message):
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        rules_policy(tmp_path, broker, "bad-budget", **rules)


def test_audit_budget_prints_each_datasets_spend(sealed, broker, tmp_path, capsys):
    _, manifest, _, _ = sealed
    rules_policy(tmp_path, broker, "budgeted", require_dp=True, dp_budget={"epsilon": 10})
    assert attempt(broker, manifest, dp_recipe(4)) == "released"
    capsys.readouterr()
    assert main(["broker", "audit", "budget", "--broker-dir", str(broker.store_dir)]) == 0
    out = capsys.readouterr().out
    assert out.strip() == "test-ds: epsilon 4, delta 1e-05 over 1 release; budget epsilon 10 (policy budgeted)"
    log = broker.store_dir / "audit.log"
    lines = log.read_text().splitlines()
    lines[0] = lines[0].replace('"register"', '"rotate"')
    log.write_text("\n".join(lines) + "\n")
    assert main(["broker", "audit", "budget", "--broker-dir", str(broker.store_dir)]) == 1  # the chain first
    assert "FAILED verification" in capsys.readouterr().err
    json.loads(lines[-1])  # the log itself is left as it was


def test_audit_budget_on_a_store_it_cannot_open_is_one_line(sealed, broker, capsys):
    """(`seal`, `train` and the policy verbs report the same StoreError: tests/broker/test_rotation.py)"""
    lock = broker.store_dir / "store.lock"
    broker.close()
    lock.unlink()
    lock.symlink_to(broker.store_dir / "elsewhere")  # opened without following links: ELOOP, even as root
    assert main(["broker", "audit", "budget", "--broker-dir", str(broker.store_dir)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"medtee: cannot open the broker store {broker.store_dir}: ") and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_a_log_rolled_back_refunds_no_budget(sealed, broker, tmp_path, capsys):
    """The sums come from the audit log, so a log restored from an older copy, cut short, emptied or removed would
    hand the spent budget back: its high-water mark refuses every decision (and `audit verify`) until the newest
    copy is back, and only the owner removing the mark accepts the loss."""
    from medtee.broker.audit import AuditLogDamaged

    _, manifest, _, _ = sealed
    rules_policy(tmp_path, broker, "budgeted", require_dp=True, dp_budget={"epsilon": 5})
    log, mark = broker.store_dir / "audit.log", broker.store_dir / "audit.log.mark"
    older = log.read_bytes()
    assert attempt(broker, manifest, dp_recipe(4)) == "released"
    newest = log.read_bytes()
    store = str(broker.store_dir)
    for rolled_back in (older, newest[:-2], newest[:len(older) + 10], b"", None):  # [:-1] keeps a whole entry
        log.unlink() if rolled_back is None else log.write_bytes(rolled_back)
        with pytest.raises(AuditLogDamaged, match="does not hold entry .* refund their privacy budget"):
            attempt(broker, manifest, dp_recipe(4))
        with pytest.raises(AuditLogDamaged, match="Restore the newest copy of audit.log"):
            EmbeddedBroker(broker.store_dir)  # every command refuses before it does any work
        capsys.readouterr()
        for action in ("verify", "budget"):
            assert main(["broker", "audit", action, "--broker-dir", store]) == 1
            assert "audit.log.mark" in capsys.readouterr().err
    log.write_bytes(newest)
    assert attempt(broker, manifest, dp_recipe(1)) == "released"
    assert attempt(broker, manifest, dp_recipe(1)) == ["broker.dp_budget"]
    log.write_bytes(older)
    mark.unlink()  # the owner accepts the loss: the releases after `older` are forgotten
    assert attempt(broker, manifest, dp_recipe(4)) == "released"
    assert main(["broker", "audit", "verify", "--broker-dir", store]) == 0


def test_the_mark_survives_a_crash_before_it_was_moved_and_refuses_damage(broker, capsys):
    """A crash between an entry's fsync and the mark's move leaves the mark on the entry before: still held, and
    moved on at the next append. A mark that is not one names itself and how to recover."""
    from medtee.broker.audit import AuditLogDamaged

    mark = broker.store_dir / "audit.log.mark"
    broker.audit.append("first")
    kept = mark.read_bytes()
    last = broker.audit.append("second")
    mark.write_bytes(kept)
    assert main(["broker", "audit", "verify", "--broker-dir", str(broker.store_dir)]) == 0
    assert broker.audit.append("third")["seq"] == last["seq"] + 1 == json.loads(mark.read_bytes())["seq"]
    for damaged in (b"{", b'{"seq": 1, "hash": "x"}', b"[]", b"x" * 5000):
        mark.write_bytes(damaged)
        with pytest.raises(AuditLogDamaged, match="audit.log.mark is not an audit high-water mark; restore it"):
            broker.audit.append("fourth")
        capsys.readouterr()
        assert main(["broker", "audit", "verify", "--broker-dir", str(broker.store_dir)]) == 1
        assert "is not an audit high-water mark" in capsys.readouterr().err


def released_with_receipt(broker, manifest, recipe, receipt=None):
    """One release for `recipe` bound to a receipt key: (release id, the key), or KeyReleaseDenied."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from medtee.attestation import report_data
    from medtee.attestation.simulated import SimulatedProvider

    receipt = receipt or Ed25519PrivateKey.generate()
    public = receipt.public_key().public_bytes_raw()
    digest = budget_digest(recipe)
    nonce, eph = broker.challenge("test-ds"), EphemeralKey.generate()
    evidence = SimulatedProvider().collect(report_data(nonce=nonce, ephemeral_public_key=eph.public_bytes,
                                                       recipe_digest=digest, receipt_public_key=public))
    _, record = broker.release(dataset_id="test-ds", nonce=nonce, evidence=evidence,
                               ephemeral_public_key=eph.public_bytes, recipe_digest=digest,
                               manifest_digest=manifest.digest(), recipe=recipe, receipt_public_key=public)
    return record.release_id, receipt


def close(broker, release_id, receipt, *, adapter: bool, last_checkpoint: str | None):
    from medtee.broker.protocol import close_message

    record = {"keys_wiped": ["data key"], "outputs": {"adapter": adapter, "last_checkpoint": last_checkpoint}}
    broker.close_release(release_id, record=record, receipt_public_key=receipt.public_key().public_bytes_raw(),
                         signature=receipt.sign(close_message(release_id, record)))


def resuming(checkpoint: str, epsilon: float = 8) -> dict:
    return dp_recipe(epsilon, trainer={"resume_from": "sha256:" + checkpoint})


def test_a_resume_continuing_an_interrupted_run_is_not_charged_again(sealed, broker, tmp_path):
    """A DP run stopped (SIGTERM, Ctrl-C) before its adapter tells the broker, in its signed close, the newest
    checkpoint it wrote: one resume of exactly that checkpoint, at the same target, goes on with the same line of
    DP-SGD and is charged nothing; the line's last run writes the adapter. Every other resume pays its target."""
    _, manifest, _, _ = sealed
    rules_policy(tmp_path, broker, "budgeted", require_dp=True, dp_budget={"epsilon": 8})
    c1, c2, c3 = "a1" * 32, "b2" * 32, "c3" * 32
    first, key = released_with_receipt(broker, manifest, dp_recipe(8))
    close(broker, first, key, adapter=False, last_checkpoint=c1)
    second, key2 = released_with_receipt(broker, manifest, resuming(c1))  # within the budget of 8: free
    [entry] = [e for e in entries(broker, "release") if e["hash"] == second]
    assert entry["dp_spend"] == budget.FREE and entry["resumes"] == first and entry["dp_target"]["epsilon"] == 8
    with pytest.raises(KeyReleaseDenied, match="broker.dp_budget"):  # a second line from the same checkpoint pays
        released_with_receipt(broker, manifest, resuming(c1))
    with pytest.raises(KeyReleaseDenied, match="broker.dp_budget"):  # the run still open reported nothing yet
        released_with_receipt(broker, manifest, resuming(c2))
    close(broker, second, key2, adapter=False, last_checkpoint=c2)
    third, key3 = released_with_receipt(broker, manifest, resuming(c2))  # the line goes on: free again
    close(broker, third, key3, adapter=True, last_checkpoint=c3)
    with pytest.raises(KeyReleaseDenied, match="broker.dp_budget"):  # after an adapter, a resume is a new line
        released_with_receipt(broker, manifest, resuming(c3))
    assert budget.spent(broker.audit.entries(), "test-ds").epsilon == 8
    reopened = EmbeddedBroker(broker.store_dir)  # the index is the log: a restarted broker decides alike
    with pytest.raises(KeyReleaseDenied, match="broker.dp_budget"):
        released_with_receipt(reopened, manifest, resuming(c1))


@pytest.mark.parametrize("why", ["another target", "an older checkpoint", "validate only", "no close"])
def test_what_a_resume_is_charged_for(sealed, broker, tmp_path, why):
    _, manifest, _, _ = sealed
    rules_policy(tmp_path, broker, "budgeted", require_dp=True, dp_budget={"epsilon": 10})
    old, newest = "d4" * 32, "e5" * 32
    first, key = released_with_receipt(broker, manifest, dp_recipe(8))
    if why != "no close":
        close(broker, first, key, adapter=False, last_checkpoint=newest)
    recipe = {"another target": resuming(newest, epsilon=2), "an older checkpoint": resuming(old),
              "validate only": dp_recipe(8, trainer={"resume_from": "sha256:" + newest, "validate_only": True}),
              "no close": resuming(newest)}[why]
    charged = {"another target": 2, "validate only": 0}.get(why, 8)
    if charged + 8 > 10:
        with pytest.raises(KeyReleaseDenied, match="broker.dp_budget"):
            released_with_receipt(broker, manifest, recipe)
    else:
        released_with_receipt(broker, manifest, recipe)
        assert budget.spent(broker.audit.entries(), "test-ds").epsilon == 8 + charged
        assert "resumes" not in entries(broker, "release")[-1]


@pytest.mark.parametrize("outputs", [None, {"adapter": "no", "last_checkpoint": None}, {"adapter": False},
                                     {"adapter": False, "last_checkpoint": "A1" * 32},
                                     {"adapter": False, "last_checkpoint": "sha256:" + "a1" * 32, "x": 1}])
def test_a_close_records_only_well_formed_outputs(outputs):
    assert budget.close_outputs(outputs) is None
    assert budget.close_outputs({"adapter": False, "last_checkpoint": "a1" * 32}) == \
        {"adapter": False, "last_checkpoint": "a1" * 32}


def test_a_resume_continues_only_a_release_of_its_own_dataset():
    recipe, target = resuming("f6" * 32), {"epsilon": 8.0, "delta": 1e-5}
    known = {"r1": {"dataset_id": "ds", "target": target}}
    kwargs = dict(releases=known, newest={"f6" * 32: "r1"}, continued=set())
    assert budget.continuation(recipe, target, "ds", **kwargs) == "r1"
    assert budget.continuation(recipe, target, "other-ds", **kwargs) is None
    assert budget.continuation(recipe, target, "ds", **{**kwargs, "continued": {"r1"}}) is None
    assert budget.continuation(recipe, budget.UNBOUNDED, "ds", **kwargs) is None
