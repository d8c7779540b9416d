import re

import pytest

from medtee.attestation import AttestationPolicy, load_policy, policy_from_mapping
from medtee.attestation.policy import MAX_POLICY_FILE_BYTES, is_policy_path, read_policy_file, resolve_policy
from medtee.paths import conf_dir

NAMES = sorted(p.stem for p in (conf_dir() / "attestation").glob("*.yaml"))


def test_shipped_policies_exist():
    assert {"simulated", "snp_h200", "snp_h100", "authenticity"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_every_shipped_policy_loads(name):
    policy = load_policy(name)
    assert policy.name == name and not policy.problems()


@pytest.mark.parametrize("name", ["snp_h200", "snp_h100"])
def test_production_policies_are_strict(name):
    p = load_policy(name)
    assert p.production and not p.allow_simulated and p.provider == "sev-snp" and p.gpu_provider == "nvidia"
    assert not p.allow_debug and not p.allow_migrate_ma and p.require_binding and p.vmpl == 0
    assert p.gpu.required and p.gpu.require_cc_mode and p.gpu.forbid_devtools
    assert p.min_tcb.snp > 0 and p.min_tcb.microcode > 0


def test_simulated_policy_says_it_protects_nothing():
    text = (conf_dir() / "attestation" / "simulated.yaml").read_text()
    assert "PROTECTS NOTHING" in text
    p = load_policy("simulated")
    assert not p.production and p.allow_simulated and p.provider == "simulated"


def test_unknown_policy_lists_known_ones():
    with pytest.raises(ValueError, match="known: .*snp_h200"):
        load_policy("nope")


@pytest.mark.parametrize("name", ["../etc/passwd", "", "a/b"])
def test_policy_name_cannot_escape(name):
    with pytest.raises(ValueError, match="file stem"):
        load_policy(name)


@pytest.mark.parametrize("data, word", [
    ({"production": True, "allow_simulated": True, "provider": "sev-snp"}, "allow_simulated"),
    ({"provider": "tdx"}, "provider"),
    ({"measurements": ["abcd"]}, "measurements"),
    ({"min_firmware": "1.2"}, "min_firmware"),
    ({"vmpl": "zero"}, "vmpl"),
    ({"gpu": {"revocation": "maybe"}}, "revocation"),
    ({"typo_field": 1}, "typo_field"),
])
def test_bad_policies_are_named(data, word):
    with pytest.raises(ValueError, match=word):
        policy_from_mapping(data, "test")


def test_schema_defaults_are_usable():
    assert not AttestationPolicy().problems()


@pytest.mark.parametrize("gpu, problem", [
    ({"require_rim_match": True}, "need gpu.rim_store"),
    ({"rim_store": "/x"}, "only with gpu.require_rim_match"),
    ({"ocsp_cache": "/x"}, "revocation is off"),
])
def test_inconsistent_gpu_fields_refused(gpu, problem):
    with pytest.raises(ValueError, match=problem):
        policy_from_mapping({"gpu": gpu}, "test")


FLOOR = {"bootloader": 1, "tee": 0, "snp": 1, "microcode": 1}


@pytest.mark.parametrize("data, problem", [
    ({"min_tcb_by_product": {"Rome": FLOOR}}, r"min_tcb_by_product: unknown product \['Rome'\]"),
    ({"products": ["Milan"], "min_tcb_by_product": {"Genoa": FLOOR}}, r"\['Genoa'\] not in products"),
    ({"min_tcb_by_product": {"Genoa": {"microcod": 1, **FLOOR}}},
     "unknown key 'min_tcb_by_product.Genoa.microcod'"),
    ({"min_tcb_by_product": {"Genoa": {"microcode": 90}}}, "Genoa leaves out bootloader, tee, snp, which would be 0"),
    ({"min_tcb_by_product": {"Turin": FLOOR}}, "Turin leaves out fmc"),
])
def test_a_product_floor_names_its_problem(data, problem):
    with pytest.raises(ValueError, match=problem):
        policy_from_mapping(data, "test")
    floors = policy_from_mapping({"min_tcb": {"snp": 8}, "min_tcb_by_product": {"Genoa": {**FLOOR, "snp": 23}}},
                                 "test")
    assert (floors.tcb_floor("Genoa").snp, floors.tcb_floor("Milan").snp, floors.tcb_floor("Turin").snp) == (23, 8, 8)


def test_rim_check_without_signxml_names_the_extra(monkeypatch, tmp_path):
    import sys
    from datetime import datetime, timezone

    from medtee.attestation.rim import rim_checks

    monkeypatch.setitem(sys.modules, "signxml", None)  # import signxml now raises ImportError
    checks = rim_checks(None, str(tmp_path), [], datetime(2026, 1, 1, tzinfo=timezone.utc), "gpu")
    assert [(c.name, c.ok) for c in checks] == [("gpu.rim.verifier", False)]


@pytest.mark.parametrize("spec, is_file", [("snp_h200", False), ("mine.yaml", True), ("mine.yml", True),
                                           ("dir/mine", True), ("./snp_h200", True)])
def test_a_policy_spec_is_a_file_by_its_suffix_or_a_directory_part(spec, is_file):
    assert is_policy_path(spec) is is_file


def test_a_policy_file_is_named_by_its_name_key_else_its_stem(tmp_path):
    shipped = (conf_dir() / "attestation" / "simulated.yaml").read_text()
    (tmp_path / "copy.yaml").write_text(shipped)
    (tmp_path / "nameless.yaml").write_text(shipped.replace("name: simulated\n", ""))
    assert resolve_policy(str(tmp_path / "copy.yaml")) == load_policy("simulated")
    nameless = read_policy_file(tmp_path / "nameless.yaml")
    assert nameless.policy.name == "nameless" and nameless.data == (tmp_path / "nameless.yaml").read_bytes()
    assert read_policy_file(tmp_path / "nameless.yaml", name="site").policy.name == "site"
    with pytest.raises(ValueError, match="says name 'simulated' but is read as 'site'; set name: site in it"):
        read_policy_file(tmp_path / "copy.yaml", name="site")


def test_a_policy_file_is_bounded_and_regular(tmp_path):
    big = tmp_path / "big.yaml"
    big.write_text("# " + "x" * MAX_POLICY_FILE_BYTES + "\n")
    with pytest.raises(ValueError, match=f"policy file {big} has .* bytes; at most {MAX_POLICY_FILE_BYTES}"):
        resolve_policy(str(big))
    with pytest.raises(ValueError, match="is not a regular file|give a policy YAML file"):
        resolve_policy(str(tmp_path))


def test_a_policy_file_of_nested_aliases_is_refused_at_once(tmp_path):
    """519 bytes of nested anchors expand to 10^9 nodes; they used to hang seal, attest verify and receipt verify."""
    from medtee.attestation.policy import read_policy_file

    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines + ["provider: simulated"]) + "\n")
    with pytest.raises(ValueError, match="line 1: YAML anchors and aliases are not allowed in policy files"):
        read_policy_file(path)


@pytest.mark.parametrize("line, key", [
    ("allow_debug: ${oc.env:MEDTEE_TEST_ALLOW_DEBUG,true}", "allow_debug"),
    ("gpu: {boards: ['${oc.env:MEDTEE_TEST_BOARD,1010-0200-882}']}", r"gpu.boards\[0\]"),
    ("allow_migrate_ma: ${gpu.require_cc_mode}", "allow_migrate_ma"),
])
def test_a_policy_file_with_an_interpolation_is_refused_naming_the_key(tmp_path, monkeypatch, line, key):
    """`${oc.env:...}` was resolved from the reader's environment: one file (one policy_sha256) meant DEBUG allowed on
    one broker and refused on another."""
    from medtee.attestation.policy import read_policy_file

    monkeypatch.setenv("MEDTEE_TEST_ALLOW_DEBUG", "true")
    path = tmp_path / "site.yaml"
    path.write_text(f"name: site\nprovider: sev_snp\n{line}\n")
    with pytest.raises(ValueError, match=f"key '{key}' is an interpolation .*write the value out"):
        read_policy_file(path)


def test_a_policy_file_named_like_a_shipped_one_must_be_it(tmp_path):
    """A loosened copy named by its stem `snp_h200.yaml` used to verify receipts "under policy 'snp_h200'"."""
    from medtee.attestation.policy import resolve_policy
    from medtee.paths import conf_dir

    text = (conf_dir() / "attestation" / "simulated.yaml").read_text().replace("name: simulated\n", "")
    (tmp_path / "evil").mkdir()
    (tmp_path / "evil" / "snp_h200.yaml").write_text(text)
    with pytest.raises(ValueError, match="named 'snp_h200', a shipped policy .* differs from; set name: in it"):
        resolve_policy(str(tmp_path / "evil" / "snp_h200.yaml"))
    shipped = conf_dir() / "attestation" / "snp_h200.yaml"
    assert resolve_policy(str(shipped)) == resolve_policy("snp_h200")
    (tmp_path / "mine.yaml").write_text(text)
    assert resolve_policy(str(tmp_path / "mine.yaml")).name == "mine"


@pytest.mark.parametrize("field, value, message", [
    ("gpu.boards", ["1010-0200"], "gpu.boards: '1010-0200' is not PROJECT-PROJECT_SKU-CHIP_SKU"),
    ("gpu.boards", ["1010-0200-88a"], "gpu.boards: '1010-0200-88a' is not PROJECT-PROJECT_SKU-CHIP_SKU"),
    ("vlek_csp_ids", [" "], "vlek_csp_ids: ' ' is empty"),
    ("vlek_csp_ids", ["CN=cc-us-east-2.amazonaws.com "], "vlek_csp_ids: 'CN=cc-us-east-2.amazonaws.com ' starts or ends "
                                                         "with spaces, which no cspID matches"),
])
def test_board_and_cloud_pins_are_checked_when_the_policy_is_read(field, value, message):
    head, _, tail = field.rpartition(".")
    data = {head: {tail: value}} if head else {tail: value}
    with pytest.raises(ValueError, match=re.escape(message)):
        policy_from_mapping(data, "site.yaml")
