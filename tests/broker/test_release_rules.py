"""What a release needs beyond fresh evidence: a registration nobody but `policy set` can change, the GPU nonce
checked by the broker itself, a pinned launch measurement under a production policy, and an approved recipe."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import pytest
import yaml
from attestation.conftest import vectors  # noqa: F401 (the shared vectors fixture)
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from medtee.attestation import Evidence, GpuEvidence, appraise, gpu_nonce, load_policy, report_data
from medtee.attestation.nvidia import parse_hex_report
from medtee.attestation.simulated import simulated_report
from medtee.broker.protocol import KeyReleaseDenied
from medtee.broker.service import EmbeddedBroker
from medtee.paths import conf_dir

from .conftest import RECIPE, call, simulated_evidence
from .test_policy_store import SIMULATED, failed, policy_file

NVTRUST = "nvidia/nvtrust/local_gpu_verifier_samples/"
STRICT = "name: strict-site\nprovider: sev_snp\nproduction: true\nrequire_binding: true\nmeasurements: ['" + "aa" * 48 + "']\n"


def events(broker) -> list[str]:
    return [json.loads(line)["event"] for line in (broker.store_dir / "audit.log").read_text().splitlines()]


def registered_policy(broker, dataset_id: str) -> str:
    return json.loads((broker.store_dir / "datasets" / f"{dataset_id}.json").read_text())["policy"]


def test_reposting_the_sealed_manifest_does_not_undo_a_policy_change(sealed, broker, serve, tmp_path):
    """The sealed directory's manifest.json (the training host has it) used to reset the policy it was sealed under."""
    out, manifest, _, _ = sealed
    broker.add_policy("strict-site", policy_file(tmp_path, STRICT))
    broker.set_policy("test-ds", "strict-site")
    before = events(broker)
    status, answer = call(serve(), "/v1/datasets", (out / "manifest.json").read_bytes())
    assert status == 201 and answer["manifest_digest"] == manifest.digest()  # a retried registration still answers
    assert registered_policy(broker, "test-ds") == "strict-site" and events(broker) == before
    assert "evidence.simulated" in failed(broker, manifest)


def test_another_trusted_owner_cannot_take_over_a_dataset(sealed, broker, tmp_path):
    """Its key_check and wrapped key are public manifest fields: another owner's copy under a looser policy used to
    replace the registration."""
    _, manifest, _, _ = sealed
    broker.add_policy("strict-site", policy_file(tmp_path, STRICT))
    broker.set_policy("test-ds", "strict-site")
    other = Ed25519PrivateKey.generate()
    (broker.store_dir / "trusted-owners").mkdir()
    (broker.store_dir / "trusted-owners" / "b.pub").write_bytes(other.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    forged = dataclasses.replace(manifest, release_policy="simulated").signed(other)
    with pytest.raises(FileExistsError, match="already registered with another manifest.*broker policy set test-ds"):
        broker.register_json(json.loads(forged.to_json()))
    assert registered_policy(broker, "test-ds") == "strict-site" and events(broker)[-1] == "refuse-register"
    assert "evidence.simulated" in failed(broker, manifest)


def gpu_policy(tmp_path, broker, name: str, *, require_binding: bool) -> None:
    doc = yaml.safe_load(SIMULATED)
    doc.update(name=name, require_binding=require_binding, gpu_provider="nvidia")
    doc["gpu"] = {**doc.get("gpu", {}), "required": True, "require_cc_mode": True, "forbid_devtools": True}
    broker.add_policy(name, policy_file(tmp_path, yaml.safe_dump(doc), f"{name}.yaml"))


def with_replayed_gpu(vectors):  # noqa: F811
    """Simulated CPU evidence bound to a real H100 capture from another machine (its own SPDM nonce)."""
    certs = x509.load_pem_x509_certificates((vectors / NVTRUST / "hopperCertChain.txt").read_bytes())
    gpu = GpuEvidence(report=parse_hex_report((vectors / NVTRUST / "hopperAttestationReport.txt").read_text()),
                      certificates=tuple(c.public_bytes(serialization.Encoding.DER) for c in certs),
                      cc_feature=True, devtools_mode=False)

    def evidence(nonce, eph):
        rd = report_data(nonce=nonce, ephemeral_public_key=eph, recipe_digest=RECIPE,
                         gpu_evidence_digests=[gpu.digest()])
        return Evidence(provider="simulated", snp_report=simulated_report(rd),
                        certificates=simulated_evidence()(nonce, eph).certificates, gpus=(gpu,), simulated=True)
    return evidence


@pytest.mark.parametrize("require_binding", [False, True])
def test_the_broker_checks_each_gpu_nonce(sealed, broker, tmp_path, vectors, require_binding):  # noqa: F811
    """The broker appraised GPU evidence without its nonce: a replayed capture passed a policy without
    require_binding, and under one with it (every production policy) no GPU evidence could ever pass."""
    _, manifest, _, _ = sealed
    name = f"gpu-dev-{require_binding}".lower()
    gpu_policy(tmp_path, broker, name, require_binding=require_binding)
    broker.set_policy("test-ds", name)
    result = failed(broker, manifest, with_replayed_gpu(vectors))
    assert "gpu[0].nonce" in result


def test_the_broker_expects_the_gpu_nonce_of_this_release(sealed, broker, monkeypatch):
    from medtee.attestation import appraise as real

    _, manifest, _, _ = sealed
    seen = {}

    def spy(evidence, policy, **kwargs):
        seen.update(kwargs)
        return real(evidence, policy, **kwargs)

    monkeypatch.setattr("medtee.attestation.appraise", spy)
    receipt_key = bytes(range(32))
    nonce = broker.challenge("test-ds")
    from medtee.crypto.hpke import EphemeralKey

    eph = EphemeralKey.generate()
    evidence = simulated_evidence()(nonce, eph.public_bytes)
    with pytest.raises(KeyReleaseDenied):  # the evidence binds no receipt key; the expected values are what matter
        broker.release(dataset_id="test-ds", nonce=nonce, evidence=evidence, ephemeral_public_key=eph.public_bytes,
                       recipe_digest=RECIPE, manifest_digest=manifest.digest(), receipt_public_key=receipt_key)
    assert seen["expected_gpu_nonce"] == gpu_nonce(nonce=nonce, ephemeral_public_key=eph.public_bytes,
                                                   recipe_digest=RECIPE, receipt_public_key=receipt_key)
    assert seen["recipe_digest"] == RECIPE
    assert seen["newest"].path == broker.store_dir / "revocation-seen.json"  # rollback of cached CRLs and OCSP


def test_a_production_policy_releases_nothing_until_a_measurement_is_pinned(vectors):  # noqa: F811
    """snp_h100/snp_h200 ship `measurements: []`: "any image" used to pass the measurement requirement."""
    report = (vectors / "snp/automata/report.bin").read_bytes()
    evidence = Evidence(provider="file", snp_report=report,
                        certificates=((vectors / "snp/automata/vek_cert.der").read_bytes(),))
    shipped = load_policy("snp_h100")
    check = {c.name: c for c in appraise(evidence, shipped, expected_report_data=None).checks}["policy.measurement"]
    assert not check.ok and "pins none" in check.expected and "medtee image measure" in check.expected
    from medtee.attestation.snp import SnpReport

    pinned = dataclasses.replace(shipped, measurements=[SnpReport.parse(report).measurement.hex()])
    assert {c.name: c for c in appraise(evidence, pinned, expected_report_data=None).checks}["policy.measurement"].ok
    development = dataclasses.replace(shipped, production=False)
    assert "policy.measurement" not in {c.name for c in appraise(evidence, development, expected_report_data=None).checks}


def rules_policy(tmp_path, broker, name: str, **rules) -> None:
    """The shipped simulated policy under `name` with these recipe rules, stored and set for test-ds."""
    doc = yaml.safe_load(SIMULATED)
    doc.update(name=name, recipe={**doc["recipe"], **rules})
    broker.add_policy(name, policy_file(tmp_path, yaml.safe_dump(doc), f"{name}.yaml"))
    broker.set_policy("test-ds", name)


def recipe_doc(**changes) -> dict:
    """A recorded recipe (what config.digest_input returns) of mode train, with `changes` ("a.b": value)."""
    doc = {"mode": "train", "tracking": {"min_aggregate": 20}, "release": {"require_audit": False},
           "privacy": {"dp": {"enabled": False}},
           "output": {"recipient": "sha256:" + "11" * 32}, "evaluation": {"study_recipient": None}}
    for dotted, value in changes.items():
        *parents, leaf = dotted.split(".")
        node = doc
        for part in parents:
            node = node[part]
        node[leaf] = value
    return doc


def attempt(broker, manifest, recipe, *, digest: str | None = None) -> list[str] | str:
    """One release for `recipe` (its real digest, unless `digest` is given): the failed checks, or "released"."""
    from medtee.broker.protocol import canonical_json
    from medtee.crypto.hpke import EphemeralKey

    digest = digest or hashlib.sha256(canonical_json(recipe)).hexdigest()
    nonce = broker.challenge("test-ds")
    eph = EphemeralKey.generate()
    try:
        broker.release(dataset_id="test-ds", nonce=nonce, evidence=simulated_evidence(digest)(nonce, eph.public_bytes),
                       ephemeral_public_key=eph.public_bytes, recipe_digest=digest, manifest_digest=manifest.digest(),
                       recipe=recipe)
    except KeyReleaseDenied as e:
        return [c.name for c in e.verdict.failures()]
    return "released"


def test_a_release_policy_can_approve_exact_recipes(sealed, broker, tmp_path):
    _, manifest, _, _ = sealed
    rules_policy(tmp_path, broker, "other", digests=["cd" * 32])
    assert failed(broker, manifest) == ["policy.recipe.digest"]
    rules_policy(tmp_path, broker, "approved", digests=[RECIPE])
    assert failed(broker, manifest) == "released"


def test_generate_is_released_only_when_the_policy_lists_it_and_its_study_key(sealed, broker, tmp_path):
    """A rating packet holds dialogue text: a recipe naming the model team's own key as the study owner used to get
    one from any dataset."""
    _, manifest, _, _ = sealed
    study, other = "22" * 32, "33" * 32
    generate = recipe_doc(**{"mode": "generate", "evaluation.study_recipient": "sha256:" + other})
    rules_policy(tmp_path, broker, "train-only", modes=["train", "eval", "sweep"])
    assert attempt(broker, manifest, recipe_doc()) == "released"
    assert attempt(broker, manifest, generate) == ["policy.recipe.mode"]
    rules_policy(tmp_path, broker, "study", modes=["train", "generate"], study_recipients=[study])
    assert attempt(broker, manifest, generate) == ["policy.recipe.study_recipient"]
    approved = recipe_doc(**{"mode": "generate", "evaluation.study_recipient": "sha256:" + study})
    assert attempt(broker, manifest, approved) == "released"


def test_the_owner_can_pin_recipients_require_the_audit_and_raise_min_aggregate(sealed, broker, tmp_path):
    _, manifest, _, _ = sealed
    rules_policy(tmp_path, broker, "strict-rules", output_recipients=["11" * 32], require_audit=True, require_dp=True,
                 min_aggregate=30)
    loose = _audited(**{"output.recipient": "dev", "release.require_audit": False})
    assert sorted(attempt(broker, manifest, loose)) == [
        "policy.recipe.min_aggregate", "policy.recipe.output_recipient", "policy.recipe.require_audit",
        "policy.recipe.require_dp"]
    good = _audited(**{"tracking.min_aggregate": 30, "privacy.dp.enabled": True})
    assert attempt(broker, manifest, good) == "released"


def test_rules_need_the_recipe_that_hashes_to_the_bound_digest(sealed, broker, tmp_path):
    _, manifest, _, _ = sealed
    rules_policy(tmp_path, broker, "train-only", modes=["train"])
    assert attempt(broker, manifest, None, digest="ef" * 32) == ["policy.recipe"]
    # a recipe that says "train" for evidence bound to another recipe (e.g. a generate run's) is refused
    assert attempt(broker, manifest, recipe_doc(), digest="ef" * 32) == ["policy.recipe"]


def test_the_owner_can_bound_single_settings_of_the_recipe(sealed, broker, tmp_path):
    """"Rank at most 16, DP with epsilon at most 3, only this model": rules on single settings, checked on the recipe
    the bound digest covers; a setting the recipe lacks fails its rule (closed), and true is not 1."""
    _, manifest, _, _ = sealed
    rules_policy(tmp_path, broker, "fields", fields=[
        {"key": "qlora.rank", "max": 16}, {"key": "privacy.dp.target_epsilon", "min": 0.5, "max": 3},
        {"key": "model.name", "one_of": ["medgemma-27b"]}, {"key": "privacy.dp.enabled", "one_of": [True]}])
    good = recipe_doc(**{"privacy.dp.enabled": True})
    good.update(qlora={"rank": 16}, model={"name": "medgemma-27b"})
    good["privacy"]["dp"]["target_epsilon"] = 3.0
    assert attempt(broker, manifest, good) == "released"
    wide = json.loads(json.dumps(good))
    wide["qlora"]["rank"], wide["model"]["name"], wide["privacy"]["dp"]["target_epsilon"] = 32, "gemma-3-27b", 8.0
    assert sorted(attempt(broker, manifest, wide)) == ["policy.recipe.field[model.name]",
                                                       "policy.recipe.field[privacy.dp.target_epsilon]",
                                                       "policy.recipe.field[qlora.rank]"]
    odd = json.loads(json.dumps(good))
    odd["privacy"]["dp"]["enabled"], odd["qlora"]["rank"] = 1, "8"  # 1 is not true; "8" is not a number
    del odd["model"]
    assert sorted(attempt(broker, manifest, odd)) == ["policy.recipe.field[model.name]",
                                                      "policy.recipe.field[privacy.dp.enabled]",
                                                      "policy.recipe.field[qlora.rank]"]
    from medtee.broker.protocol import canonical_json
    from medtee.crypto.hpke import EphemeralKey

    nonce, eph, digest = broker.challenge("test-ds"), EphemeralKey.generate(), hashlib.sha256(canonical_json(odd)).hexdigest()
    with pytest.raises(KeyReleaseDenied) as denied:
        broker.release(dataset_id="test-ds", nonce=nonce, evidence=simulated_evidence(digest)(nonce, eph.public_bytes),
                       ephemeral_public_key=eph.public_bytes, recipe_digest=digest, manifest_digest=manifest.digest(),
                       recipe=odd)
    text = denied.value.verdict.explain()
    assert 'policy.recipe.field[model.name]: expected one of ["medgemma-27b"], got no such setting' in text
    assert 'policy.recipe.field[qlora.rank]: expected <= 16, got "8"' in text  # the string, told apart from 8
    assert "policy.recipe.field[privacy.dp.enabled]: expected one of [true], got 1" in text


def sweep_doc(**parameters) -> dict:
    """A recorded sweep recipe whose own qlora.rank is 8 and whose search space is `parameters`."""
    doc = recipe_doc(mode="sweep")
    doc.update(qlora={"rank": 8, "dropout": 0.05}, model={"tiny": {"hidden_size": 64}})
    doc["sweep"] = {"name": "s", "parameters": {k: {"choices": None, "high": None, "log": False, "low": None,
                                                    "step": None, **d} for k, d in parameters.items()}}
    return doc


def test_a_sweep_is_held_to_the_setting_rules_for_every_trial(sealed, broker, tmp_path):
    """One release serves every trial, and each trial overrides the swept settings: a sweep whose own qlora.rank was
    8 got the key under `qlora.rank max 16` while its trials trained at rank 32."""
    _, manifest, _, _ = sealed
    rules_policy(tmp_path, broker, "sweep-rules", fields=[
        {"key": "qlora.rank", "max": 16}, {"key": "qlora.dropout", "one_of": [0.0, 0.05, 0.1]},
        {"key": "model.tiny", "one_of": [{"hidden_size": 64}]}])
    wide = sweep_doc(**{"qlora.rank": {"type": "int", "low": 8.0, "high": 32.0, "step": 8.0}})
    assert attempt(broker, manifest, wide) == ["policy.recipe.field[qlora.rank]"]
    assert attempt(broker, manifest, sweep_doc(**{"qlora.rank": {"type": "int", "low": 4.0, "high": 16.0}})) == "released"
    assert attempt(broker, manifest, sweep_doc(**{"qlora.rank": {"type": "categorical", "choices": [8, 64]}})) == [
        "policy.recipe.field[qlora.rank]"]
    assert attempt(broker, manifest, sweep_doc(**{"qlora.dropout": {"type": "float", "low": 0.0, "high": 0.1}})) == [
        "policy.recipe.field[qlora.dropout]"]  # a continuous range is no finite list of values
    grid = sweep_doc(**{"qlora.dropout": {"type": "float", "low": 0.0, "high": 0.1, "step": 0.05}})
    assert attempt(broker, manifest, grid) == "released"
    inner = sweep_doc(**{"model.tiny.hidden_size": {"type": "categorical", "choices": [64, 4096]}})
    assert attempt(broker, manifest, inner) == ["policy.recipe.field[model.tiny]"]
    assert attempt(broker, manifest, dict(wide, mode="train")) == "released"  # a training run does not use the space


@pytest.mark.parametrize("rules, words", [
    (dict(fields=[{"key": "rank", "max": 16}]), r"recipe.fields\[0\].key='rank' is not a recipe setting"),
    (dict(fields=[{"key": "qlora.rank"}]), r"recipe.fields\[0\] \(qlora.rank\) restricts nothing"),
    (dict(fields=[{"key": "model.name", "one_of": []}]), r"one_of \(model.name\) is empty"),
    (dict(fields=[{"key": "qlora.rank", "min": 16, "max": 8}]), r"min 16.0 is above max 8.0"),
    (dict(fields=[{"key": "qlora.rank", "max": 16}, {"key": "qlora.rank", "min": 4}]),
     r"recipe.fields: qlora.rank has more than one rule"),
    (dict(fields=[{"key": "qlora.rank", "mx": 16}]), r"unknown key 'mx'"),
    (dict(fields=[{"key": "data.path", "one_of": ["/data/ds"]}]), r"recipe.fields\[0\].key=data.path is left out of the "
                                                                  r"recipe digest"),
    (dict(fields=[{"key": "trainer.resume_from", "one_of": ["ckpt/last.ckpt"]}]),
     r"the recipe records this file as sha256:<hex of its content>"),
])
def test_setting_rules_are_validated(tmp_path, rules, words):
    with pytest.raises(ValueError, match=words):
        rules_policy(tmp_path, EmbeddedBroker(tmp_path / "b"), "bad", **rules)


@pytest.mark.parametrize("rules, words", [
    (dict(digests=["recipe=demo"]), "recipe.digests: 'recipe=demo' is not a recipe digest.*medtee recipes digest"),
    (dict(modes=["train", "exfiltrate"]), "recipe.modes: unknown \\['exfiltrate'\\]"),
    (dict(study_recipients=["study.pub"]), "recipe.study_recipients: 'study.pub' is not the sha256.*sha256sum"),
])
def test_recipe_rules_are_validated(tmp_path, rules, words):
    with pytest.raises(ValueError, match=words):
        rules_policy(tmp_path, EmbeddedBroker(tmp_path / "b"), "bad", **rules)


def test_a_production_policy_allowing_generate_names_its_study_keys(tmp_path):
    doc = yaml.safe_load((conf_dir() / "attestation" / "snp_h200.yaml").read_text())
    doc.update(name="site", measurements=["aa" * 48])
    doc["recipe"]["modes"].append("generate")
    with pytest.raises(ValueError, match="production policy must name the study keys .* recipe.study_recipients"):
        EmbeddedBroker(tmp_path / "b").add_policy("site", policy_file(tmp_path, yaml.safe_dump(doc)))


def test_an_authenticity_only_policy_is_never_a_release_policy(sealed, broker, tmp_path):
    """It checks only genuineness: set on a dataset, any genuine guest (DEBUG ones too) would have got the key."""
    _, manifest, _, _ = sealed
    with pytest.raises(ValueError, match="checks only that evidence is genuine and releases no key"):
        broker.set_policy("test-ds", "authenticity")
    doc = yaml.safe_load((conf_dir() / "attestation" / "authenticity.yaml").read_text())
    doc["name"] = "site-audit"
    with pytest.raises(ValueError, match="is authenticity_only: it checks only that evidence is genuine"):
        broker.add_policy("site-audit", policy_file(tmp_path, yaml.safe_dump(doc)))
    # a registration that names one (written before this rule) is denied at release
    path = broker.store_dir / "datasets" / "test-ds.json"
    path.write_text(path.read_text().replace('"policy": "simulated"', '"policy": "authenticity"'))
    assert failed(broker, manifest) == ["broker.policy"]


AUDIT = {"release.require_audit": True, "release.max_exposure_bits": 10.0, "release.max_exposure_at": {},
         "release.max_extraction_above_base": 0.05, "release.references": 4096, "release.extraction_examples": 64,
         "release.suffix_tokens": 50}


def _audited(**changes) -> dict:
    """recipe_doc with the audit's settings as shipped (require_audit on), and `changes` to any setting."""
    changes = {**AUDIT, **changes}
    doc = recipe_doc(**{k: v for k, v in changes.items() if not k.startswith("release.")})
    doc["release"].update({k.split(".", 1)[1]: v for k, v in changes.items() if k.startswith("release.")})
    return doc


def test_a_required_audit_cannot_be_loosened_by_its_thresholds(sealed, broker, tmp_path):
    """`require_audit` used to check only that the audit ran: a recipe loosening it (a per-repeat override of 11.9
    bits, an extraction rate of 0.99, one extraction prompt) got the key."""
    _, manifest, _, _ = sealed
    rules_policy(tmp_path, broker, "audited", require_audit=True)
    assert attempt(broker, manifest, _audited()) == "released"  # the audit's own defaults
    assert attempt(broker, manifest, _audited(**{"release.max_exposure_bits": 6.0,
                                                 "release.max_exposure_at": {"1": 4.0}})) == "released"  # stricter
    loosened = {
        "release.max_exposure_at": {"1": 11.9}, "release.max_exposure_bits": 11.0,
        "release.max_extraction_above_base": 0.99, "release.references": 16, "release.extraction_examples": 1,
        "release.suffix_tokens": 400}
    names = {"release.max_exposure_at": "max_exposure_bits", "release.max_exposure_bits": "max_exposure_bits",
             "release.max_extraction_above_base": "max_extraction_above_base", "release.references": "min_references",
             "release.extraction_examples": "min_extraction_examples", "release.suffix_tokens": "max_suffix_tokens"}
    for key, value in loosened.items():
        assert attempt(broker, manifest, _audited(**{key: value})) == [f"policy.recipe.audit.{names[key]}"], key
    doc = _audited()
    del doc["release"]["max_exposure_at"]  # a recipe without the setting fails closed
    assert attempt(broker, manifest, doc) == ["policy.recipe.audit.max_exposure_bits"]
    rules_policy(tmp_path, broker, "looser", require_audit=True, audit={"max_exposure_bits": 12.0})
    assert attempt(broker, manifest, _audited(**{"release.max_exposure_at": {"1": 11.9}})) == "released"


def test_an_audit_floor_that_cannot_be_met_is_refused_when_the_policy_is_read(tmp_path, broker):
    doc = yaml.safe_load(SIMULATED)
    doc.update(name="nan-floor", recipe={**doc["recipe"], "require_audit": True,
                                         "audit": {"max_exposure_bits": float("nan"), "min_references": 0}})
    with pytest.raises(Exception, match=r"recipe.audit.max_exposure_bits=nan must be a finite number.*"
                                        r"recipe.audit.min_references=0 must be at least 1"):
        broker.add_policy("nan-floor", policy_file(tmp_path, yaml.safe_dump(doc), "nan-floor.yaml"))
