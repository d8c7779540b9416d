"""`medtee image measure`: sev-snp-measure's own expectations, our CLI against the library, --into, bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from sevsnpmeasure import guest
from sevsnpmeasure.sev_mode import SevMode
from sevsnpmeasure.vcpu_types import CPU_SIGS
from sevsnpmeasure.vmm_types import VMMType

from medtee.attestation import policy_from_mapping
from medtee.cli import main
from medtee.paths import conf_dir

from .conftest import KERNEL_HASHES, SEC_MEM, ovmf_bytes

# sev-snp-measure tests/test_guest.py (commit 8f2b337): the cases that take a precomputed OVMF hash, whose result
# depends only on the OVMF footer table, which tests/image/conftest.py rebuilds. (name, append, guest features,
# expected digest); all with 1 vCPU of type EPYC-v4, an empty kernel and initrd.
UPSTREAM_OVMF_HASH = "086e2e9149ebf45abdc3445fba5b2da8270bdbb04094d7a2c37faaa4b24af3aa16aff8c374c2a55c467a50da6d466b74"
UPSTREAM = [
    ("test_snp_ovmf_hash_gen_default", "", "0x21",
     "329c8ce0972ae52343b64d34a434a86f245dfd74f5ed7aae15d22efc78fb9683632b9b50e4e1d7fa41179ef98a7ef198"),
    ("test_snp_ovmf_hash_gen_feature_snp_only", "", "0x1",
     "ddc5224521617a536ee7ce9dd6224d1b58a8d4fda1c741f3ac99fc4bfa04ba6e9fc98646d4a07a9079397fa3852819b5"),
    ("test_snp_ovmf_hash_full_default", "console=ttyS0 loglevel=7", "0x21",
     "803f691094946e42068aaa3a8f9e26a5c89f36f7b73ecfb28c653360fe4b3aba7e534442e7e1e17895dfe778d0228977"),
    ("test_snp_ovmf_hash_full_feature_snp_only", "console=ttyS0 loglevel=7", "0x1",
     "6d287813eb5222d770f75005c664e34c204f385ce832cc2ce7d0d6f354454362f390ef83a92046c042e706363b4b08fa"),
]
VERITY_CMDLINE = ("console=ttyS0 root=/dev/mapper/root ro systemd.verity_root_data=/dev/vda1 "
                  "systemd.verity_root_hash=" + "5a" * 32)


def measure_args(image: dict, *extra: str, append: str = "", vcpus: str = "1", vcpu_type: str = "EPYC-v4") -> list:
    args = ["image", "measure", "--ovmf", str(image["ovmf"]), "--kernel", str(image["kernel"]),
            "--initrd", str(image["initrd"]), "--append", append, "--vcpus", vcpus, *extra]
    return args + (["--vcpu-type", vcpu_type] if vcpu_type else [])


def measured(capsys, args: list) -> str:
    assert main(args) == 0, capsys.readouterr().err
    return capsys.readouterr().out.strip()


@pytest.mark.parametrize("name, append, features, expected", UPSTREAM, ids=[u[0] for u in UPSTREAM])
def test_upstream_expected_digests(image, capsys, name, append, features, expected):
    args = measure_args(image, "--guest-features", features, "--snp-ovmf-hash", UPSTREAM_OVMF_HASH, append=append)
    assert measured(capsys, args) == expected


@pytest.mark.parametrize("vmm", ["qemu", "ec2", "gce"])
@pytest.mark.parametrize("vcpu_type", ["EPYC-v4", "EPYC-Milan", "EPYC-Genoa", "EPYC-Turin"])
@pytest.mark.parametrize("vcpus", [1, 4])
def test_cli_equals_the_library(image, capsys, vmm, vcpu_type, vcpus):
    image["kernel"].write_bytes(b"\x7fELF kernel " * 100)
    image["initrd"].write_bytes(b"070701 initrd " * 100)
    args = measure_args(image, "--vmm-type", vmm, "--guest-features", "0x21", append=VERITY_CMDLINE,
                        vcpus=str(vcpus), vcpu_type=vcpu_type)
    ours = measured(capsys, args)
    theirs = guest.calc_launch_digest(SevMode.SEV_SNP, vcpus, CPU_SIGS[vcpu_type], str(image["ovmf"]),
                                      str(image["kernel"]), str(image["initrd"]), VERITY_CMDLINE, 0x21,
                                      vmm_type=VMMType[{"qemu": "QEMU"}.get(vmm, vmm)])
    assert ours == theirs.hex() and len(ours) == 96


def test_every_input_changes_the_measurement(image, capsys):
    base = measured(capsys, measure_args(image, append=VERITY_CMDLINE))
    variants = [measure_args(image, append=VERITY_CMDLINE.replace("5a", "5b", 1)),
                measure_args(image, append=VERITY_CMDLINE, vcpus="2"),
                measure_args(image, append=VERITY_CMDLINE, vcpu_type="EPYC-Genoa"),
                measure_args(image, "--guest-features", "0x21", append=VERITY_CMDLINE),
                measure_args(image, "--vmm-type", "ec2", append=VERITY_CMDLINE)]
    results = [measured(capsys, v) for v in variants]
    image["kernel"].write_bytes(b"another kernel")
    results.append(measured(capsys, measure_args(image, append=VERITY_CMDLINE)))
    assert len({base, *results}) == len(results) + 1


def test_json_output(image, capsys):
    doc = json.loads(measured(capsys, measure_args(image, "--json", "--vcpus", "2")))
    assert doc["measurement"] == measured(capsys, measure_args(image, vcpus="2"))
    assert doc["vcpus"] == 2 and doc["vmm_type"] == "qemu" and doc["guest_features"] == "0x1"


def shipped_copy(tmp_path, name="snp_h200"):
    path = tmp_path / "mine.yaml"
    path.write_text((conf_dir() / "attestation" / f"{name}.yaml").read_text().replace(f"name: {name}", "name: mine"))
    return path


def loaded(path):
    from omegaconf import OmegaConf

    return policy_from_mapping(OmegaConf.load(path), str(path))


def test_into_pins_the_measurement_keeping_the_file(image, tmp_path, capsys):
    policy = shipped_copy(tmp_path)
    assert main(measure_args(image, "--into", str(policy))) == 0
    out, err = capsys.readouterr()
    m = out.strip()
    assert f"pinned: {m} in {policy}" in err and "medtee broker policy add NAME" in err
    assert loaded(policy).measurements == [m]
    assert "# Pin the launch measurement" in policy.read_text()  # a flow-style list is edited in place
    other = measured(capsys, measure_args(image, "--into", str(policy), vcpus="2"))
    assert loaded(policy).measurements == [m, other]
    before = policy.read_bytes()
    assert main(measure_args(image, "--into", str(policy))) == 0
    assert "already pinned" in capsys.readouterr().err
    assert policy.read_bytes() == before  # no duplicate


KEPT = "AB" * 48  # an entry already there, kept as written


@pytest.mark.parametrize("body, kept", [
    ("", []),
    (f"measurements:\n  - {KEPT}\n", [KEPT]),
    (f"measurements: ['{KEPT}']  # approved 2025-01\n", [KEPT]),
], ids=["absent", "block list", "flow list with a comment"])
def test_into_creates_or_extends_the_list(image, tmp_path, capsys, body, kept):
    policy = tmp_path / "p.yaml"
    policy.write_text(f"name: p\nprovider: file\n{body}")
    m = measured(capsys, measure_args(image, "--into", str(policy)))
    assert loaded(policy).measurements == kept + [m] and loaded(policy).name == "p"
    assert ("# approved 2025-01" in policy.read_text()) == ("#" in body)


def test_into_policy_then_pins_that_measurement(image, tmp_path, capsys):
    """The pinned file, stored in a broker, admits only that measurement (here: not the simulated one)."""
    from medtee.attestation import appraise, collect_evidence
    from medtee.broker.service import EmbeddedBroker

    policy = tmp_path / "dev.yaml"
    policy.write_text((conf_dir() / "attestation" / "simulated.yaml").read_text().replace("name: simulated", ""))
    m = measured(capsys, measure_args(image, "--into", str(policy)))
    broker = EmbeddedBroker(tmp_path / "broker")
    assert main(["broker", "policy", "add", "dev-pinned", str(policy), "--broker-dir", str(broker.store_dir)]) == 0
    pinned, _ = broker._policy("dev-pinned")
    assert pinned.measurements == [m]
    evidence = collect_evidence("simulated", None, nonce=b"n" * 32, ephemeral_public_key=b"k" * 32,
                                recipe_digest="ab" * 32)
    verdict = appraise(evidence, pinned, expected_report_data=None)
    assert [c.name for c in verdict.failures() if c.name == "policy.measurement"] == ["policy.measurement"]


BAD = [
    ("missing ovmf", lambda i: measure_args({**i, "ovmf": i["ovmf"].with_name("nope.fd")}), "--ovmf"),
    ("missing kernel", lambda i: measure_args({**i, "kernel": i["kernel"].with_name("nope")}), "--kernel"),
    ("missing initrd", lambda i: measure_args({**i, "initrd": i["initrd"].parent}), "--initrd"),
    ("bad vcpu type", lambda i: measure_args(i, vcpu_type="EPYC-Zen9"), "--vcpu-type 'EPYC-Zen9' is unknown"),
    ("no vcpu type for qemu", lambda i: measure_args(i, vcpu_type=None), "--vcpu-type is needed"),
    ("bad hex", lambda i: measure_args(i, "--guest-features", "0xZZ"), "--guest-features '0xZZ' is not hex"),
    ("too wide hex", lambda i: measure_args(i, "--guest-features", "1" * 17), "is not hex"),
    ("zero vcpus", lambda i: measure_args(i, vcpus="0"), "--vcpus must be at least 1"),
    ("vcpus not a number", lambda i: measure_args(i, vcpus="four"), "--vcpus 'four'"),
    ("bad vmm", lambda i: measure_args(i, "--vmm-type", "xen"), "--vmm-type 'xen' is unknown"),
    ("bad ovmf hash", lambda i: measure_args(i, "--snp-ovmf-hash", "abc"), "--snp-ovmf-hash must be 96 hex"),
]


@pytest.mark.parametrize("case, make, message", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_one_line_exit_2_before_any_hashing(image, capsys, monkeypatch, case, make, message):
    monkeypatch.setattr(guest, "calc_launch_digest", lambda *a, **k: pytest.fail("hashed despite bad input"))
    assert main(make(image)) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1 and message in err, err


@pytest.mark.parametrize("blob, message", [
    (ovmf_bytes(sections=((0x800000, 0x9000, SEC_MEM),)), "no SNP kernel-hashes section"),
    (b"\0" * 4096, "not an SEV-SNP OVMF build"),
    (ovmf_bytes(sections=((0x810000, 0x1000, KERNEL_HASHES), (0x811000, 0x1000, 0x77))), "not an SEV-SNP OVMF"),
], ids=["OvmfX64-like (no kernel hashes)", "no footer table", "unknown section type"])
def test_unusable_ovmf_is_refused(image, capsys, blob, message):
    image["ovmf"].write_bytes(blob)
    assert main(measure_args(image)) == 2
    err = capsys.readouterr().err
    assert message in err and str(image["ovmf"]) in err and len(err.strip().splitlines()) == 1


def test_library_refusal_is_one_line(image, capsys):
    image["ovmf"].write_bytes(ovmf_bytes(size=4096 + 16))  # not whole pages: sev-snp-measure asserts
    assert main(measure_args(image)) == 2
    assert "sev-snp-measure cannot measure it" in capsys.readouterr().err


@pytest.mark.parametrize("content, message", [
    (None, "no such policy file"),
    ("measurements: [abc]\n", "is not 96 hex characters"),
    ("provider: [oops\n", "not a YAML mapping"),
    ("- a\n- b\n", "is a YAML list"),
    ("bogus_field: 1\n", "bogus_field"),
], ids=["missing", "bad measurement", "bad yaml", "list", "unknown field"])
def test_bad_into_file_is_refused_before_hashing(image, tmp_path, capsys, monkeypatch, content, message):
    monkeypatch.setattr(guest, "calc_launch_digest", lambda *a, **k: pytest.fail("hashed despite bad input"))
    policy = tmp_path / "p.yaml"
    if content is not None:
        policy.write_text(content)
    assert main(measure_args(image, "--into", str(policy))) == 2
    err = capsys.readouterr().err
    assert message in err and str(policy) in err and len(err.strip().splitlines()) == 1, err
    assert (policy.read_text() if content is not None else None) == content


def test_help_does_not_import_sev_snp_measure():
    probe = ("import sys\nfrom medtee.cli import build_parser\nbuild_parser().format_help()\n"
             "print(sorted(m for m in sys.modules if m.split('.')[0] in ('sevsnpmeasure', 'omegaconf')))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "[]", out.stderr
