"""RIM verification and comparison: the nvtrust test RIMs (../shared/vectors) and RIMs signed here by a test CA."""

import dataclasses
import functools
import shutil
from datetime import datetime, timedelta, timezone

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from medtee.attestation import GpuEvidence, load_policy, policy_from_mapping
from medtee.attestation.nvidia import gpu_evidence_checks, parse_hex_report, parse_spdm

pytest.importorskip("signxml", reason="signxml is not installed: RIM verification needs the 'nvidia' extra")

from medtee.attestation.rim import RimError, rim_root, verify_rim  # noqa: E402

NOW = datetime(2025, 1, 1, tzinfo=timezone.utc)  # inside the nvtrust test RIM signer's validity (ends 2025-06-26)
SAMPLES = "nvidia/nvtrust/local_gpu_verifier_samples"
DRIVER, VBIOS = "Driver_RIM_test_no_gpu.swidtag", "1010_0200_882_96005E0001_test_no_gpu.swidtag"
DRIVER_TAG = "f0d3a263ab9ef4b93c8fc9727493b61a979814cbf31c07614842a9486b84db8c6cb2c94fb3d5d55992fc482ab495df0d"
DRIVER_VERSION, VBIOS_VERSION = "550.90.07", "96.00.9F.00.01"  # what the nvtrust H100 report states
SWID = "http://standards.iso.org/iso/19770/-2/2015/schema.xsd"


@pytest.fixture
def store(vectors, tmp_path):
    """A RIM store (in tmp_path) with the nvtrust driver and VBIOS test RIMs and NVIDIA's RIM root."""
    for name in (DRIVER, VBIOS):
        shutil.copy(vectors / SAMPLES / name, tmp_path / name)
    shutil.copy(vectors / "nvidia/nvtrust/roots/verifier_RIM_root.pem", tmp_path / "rim_root.pem")
    return tmp_path


@pytest.fixture
def sample(vectors):
    certs = x509.load_pem_x509_certificates((vectors / SAMPLES / "hopperCertChain.txt").read_bytes())
    return GpuEvidence(report=parse_hex_report((vectors / SAMPLES / "hopperAttestationReport.txt").read_text()),
                       certificates=tuple(c.public_bytes(Encoding.DER) for c in certs), cc_feature=True,
                       devtools_mode=False)


def rim_policy(store, allowed=()):
    base = dataclasses.asdict(load_policy("snp_h200"))
    base["gpu"].update(rim_store=str(store), require_rim_match=True, allowed_rim_ids=list(allowed), revocation="off")
    return policy_from_mapping(base, "test")


def rim_failures(gpu, policy, now=NOW):
    checks = gpu_evidence_checks(gpu, policy, expected_nonce=parse_spdm(gpu.report).nonce, now=now)
    return {c.name: c for c in checks if not c.ok and ".rim" in c.name}, checks


def test_nvtrust_rims_are_signed_under_nvidia_rim_root(store):
    root = rim_root(store)
    driver, vbios = verify_rim(store / DRIVER, root, NOW), verify_rim(store / VBIOS, root, NOW)
    assert driver.tag_id == DRIVER_TAG and driver.version == "545.00" and len(driver.measurements) == 21
    assert vbios.version == "96.00.5E.00.01" and len(vbios.measurements) == 12
    assert len(driver.measurements[23]) == 2 and len(vbios.measurements[12]) == 4  # alternatives


def test_nvtrust_rims_are_for_other_versions_than_the_h100_report(store, sample):
    """The report states driver 550.90.07 and VBIOS 96.00.9F.00.01; the store's RIMs are 545.00 and 96.00.5E.00.01."""
    failures, checks = rim_failures(sample, rim_policy(store))
    assert set(failures) == {"gpu.rim.driver", "gpu.rim.vbios"}
    assert "for the reported version 550.90.07" in failures["gpu.rim.driver"].expected
    assert f"{DRIVER} (545.00)" in failures["gpu.rim.driver"].actual
    assert "add the driver RIM of version 550.90.07" in failures["gpu.rim.driver"].actual
    assert "for the reported version 96.00.9F.00.01" in failures["gpu.rim.vbios"].expected
    assert not [c for c in checks if not c.ok and ".rim" not in c.name]  # only the RIM comparison fails


def _claiming(spdm, driver: str, vbios: str):
    """`spdm` with its opaque driver and VBIOS versions replaced (the RIM comparison reads no signature)."""
    from medtee.attestation.nvidia import OPAQUE_DRIVER_VERSION, OPAQUE_VBIOS_VERSION

    v = [int(p, 16) for p in vbios.split(".")]
    opaque = {**spdm.opaque, OPAQUE_DRIVER_VERSION: driver.encode() + b"\0",
              OPAQUE_VBIOS_VERSION: bytes([v[3], v[2], v[1], v[0], v[4], 0, 0, 0])}
    return dataclasses.replace(spdm, opaque=opaque)


def test_nvtrust_rims_measurements_differ_from_the_h100_report(store, sample):
    from medtee.attestation.rim import rim_checks

    spdm = _claiming(parse_spdm(sample.report), "545.00", "96.00.5E.00.01")
    assert (spdm.driver_version, spdm.vbios_version) == ("545.00", "96.00.5E.00.01")
    failures = {c.name: c for c in rim_checks(spdm, str(store), [], NOW, "gpu") if not c.ok}
    per_index = sorted(int(n.split("[")[1].rstrip("]")) for n in failures if "measurement[" in n)
    assert per_index == [1, 2, 3, 7, 9, 11, 21, 22, 25, 26, 27, 29, 30, 31, 32, 34, 36, 37, 39, 40]
    assert "20 of 33 differ" in failures["gpu.rim.measurements"].actual
    m7 = failures["gpu.rim.measurement[7]"]
    assert m7.expected == f"0e0ee161b59bf124... ({DRIVER})" and m7.actual == spdm.measurements[8].hex()[:16] + "..."


def test_allowed_rim_ids_restrict_the_store(store, sample):
    failures, _ = rim_failures(sample, rim_policy(store, [DRIVER_TAG]))
    assert f"the store has: {DRIVER} (545.00))" in failures["gpu.rim.vbios"].actual  # the VBIOS RIM is not allowed
    failures, _ = rim_failures(sample, rim_policy(store, ["not-a-tag"]))
    assert "the store has: none" in failures["gpu.rim.driver"].actual


def test_tampered_rim_fails_its_signature(store, sample):
    path = store / DRIVER
    data = path.read_bytes()
    assert data.count(b"0e0ee161b59bf124") == 1
    path.write_bytes(data.replace(b"0e0ee161b59bf124", b"0e0ee161b59bf125"))
    with pytest.raises(RimError, match="signature"):
        verify_rim(path, rim_root(store), NOW)
    failures, _ = rim_failures(sample, rim_policy(store))
    assert f"gpu.rim.signature[{DRIVER}]" in failures


def test_unsigned_rim_rejected(store):
    path = store / DRIVER
    text = path.read_text()
    path.write_text(text[: text.index("<ds:Signature")] + text[text.index("</ds:Signature>") + 15 :])
    with pytest.raises(RimError, match="unsigned"):
        verify_rim(path, rim_root(store), NOW)


def test_wrong_root_rejected(store, vectors):
    shutil.copy(vectors / "nvidia/nvtrust/roots/verifier_device_root.pem", store / "rim_root.pem")
    with pytest.raises(RimError, match="pinned RIM root"):
        verify_rim(store / DRIVER, rim_root(store), NOW)


def test_expired_signer_rejected(store):
    with pytest.raises(RimError, match="not valid at"):
        verify_rim(store / DRIVER, rim_root(store), datetime(2026, 1, 1, tzinfo=timezone.utc))


def test_missing_root_named(tmp_path, sample):
    failures, _ = rim_failures(sample, rim_policy(tmp_path))
    assert "rim_root.pem" in failures["gpu.rim.store"].actual


# --- RIMs signed here by a test CA: the matching path must pass -------------------------------------------------


def _cert(subject, issuer, key, signer, ca, path_length=None):
    name = lambda cn: x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])  # noqa: E731
    return (x509.CertificateBuilder().subject_name(name(subject)).issuer_name(name(issuer))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(NOW - timedelta(days=1)).not_valid_after(NOW + timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=path_length), critical=True)
            .sign(signer, hashes.SHA384()))


@pytest.mark.parametrize("mid_ca, root_path_length, refused", [
    (True, None, None), (False, None, "not a CA"), (True, 0, "path length 0"),
])
def test_every_issuer_in_a_gpu_or_rim_chain_must_be_a_ca_within_its_path_length(mid_ca, root_path_length, refused,
                                                                                  monkeypatch):
    """A link used to need only a valid signature: a leaf's key could vouch for another leaf beneath it."""
    from medtee.attestation import nvidia, rim

    keys = [ec.generate_private_key(ec.SECP384R1()) for _ in range(3)]
    root = _cert("Test root", "Test root", keys[0], keys[0], True, root_path_length)
    mid = _cert("Test mid", "Test root", keys[1], keys[0], mid_ca)
    leaf = _cert("Test leaf", "Test mid", keys[2], keys[1], False)
    monkeypatch.setattr(nvidia, "device_root", lambda: root)
    [chain] = [c for c in nvidia.chain_checks([leaf, mid, root], NOW, "gpu[0]") if c.name == "gpu[0].chain"]
    if refused is None:
        assert chain.ok, chain.actual
        rim._check_chain([leaf, mid], root, NOW)
    else:
        assert not chain.ok and refused in chain.actual
        with pytest.raises(RimError, match=refused):
            rim._check_chain([leaf, mid], root, NOW)


@functools.cache
def _test_rim_ca():
    """A test RIM root and signer: (root certificate, signer key, signer certificate)."""
    root_key, leaf_key = ec.generate_private_key(ec.SECP384R1()), ec.generate_private_key(ec.SECP384R1())
    root = _cert("Test RIM root", "Test RIM root", root_key, root_key, True)
    return root, leaf_key, _cert("Test RIM signer", "Test RIM root", leaf_key, root_key, False)


def _signed_rim(measurements: dict[int, list[bytes]], version=DRIVER_VERSION, tag="test-tag"):
    from lxml import etree
    from signxml import XMLSigner

    root, leaf_key, leaf = _test_rim_ca()
    doc = etree.Element(f"{{{SWID}}}SoftwareIdentity", nsmap={None: SWID}, tagId=tag, name="GH100", version="1.0")
    etree.SubElement(doc, f"{{{SWID}}}Meta", colloquialVersion=version)
    payload = etree.SubElement(doc, f"{{{SWID}}}Payload")
    for index, values in measurements.items():
        res = etree.SubElement(payload, f"{{{SWID}}}Resource", type="Measurement", index=str(index), active="True",
                               alternatives=str(len(values)))
        for k, v in enumerate(values):
            res.set(f"{{http://www.w3.org/2001/04/xmlenc#sha384}}Hash{k}", v.hex())
    signer = XMLSigner(signature_algorithm="ecdsa-sha384", digest_algorithm="sha384",
                       c14n_algorithm="http://www.w3.org/2006/12/xml-c14n11")
    pem = lambda c: c.public_bytes(Encoding.PEM)  # noqa: E731
    key_pem = leaf_key.private_bytes(Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    signed = signer.sign(doc, key=key_pem, cert=[pem(leaf), pem(root)])
    return etree.tostring(signed), pem(root)


def _test_store(path, rims: dict[str, bytes]):
    """A store under the test RIM root holding `rims` (file name -> signed XML)."""
    for name, xml in rims.items():
        (path / name).write_bytes(xml)
    (path / "rim_root.pem").write_bytes(_test_rim_ca()[0].public_bytes(Encoding.PEM))
    return path


def test_matching_rims_pass_and_alternatives_count(tmp_path, sample):
    ms = parse_spdm(sample.report).measurements
    store = _test_store(tmp_path, {"driver.swidtag": _signed_rim({7: [bytes(48), ms[8]], 40: [ms[41]]})[0],
                                   "vbios.swidtag": _signed_rim({0: [ms[1]]}, VBIOS_VERSION)[0]})
    failures, checks = rim_failures(sample, rim_policy(store))
    assert not failures
    assert any(c.name == "gpu.rim.measurements" and c.ok and "all 3" in c.expected for c in checks)


def test_another_versions_rim_is_not_pooled(tmp_path, sample):
    """An older driver's RIM whose value matches must not stand in for the reported version's RIM, which differs."""
    ms = parse_spdm(sample.report).measurements
    store = _test_store(tmp_path, {"driver.swidtag": _signed_rim({7: [bytes(48)]})[0],
                                   "driver-old.swidtag": _signed_rim({7: [ms[8]]}, "535.104.05")[0],
                                   "vbios.swidtag": _signed_rim({0: [ms[1]]}, VBIOS_VERSION)[0]})
    failures, _ = rim_failures(sample, rim_policy(store))
    assert set(failures) == {"gpu.rim.measurement[7]", "gpu.rim.measurements"}
    assert "(driver.swidtag)" in failures["gpu.rim.measurement[7]"].expected


def test_two_different_rims_of_one_version_are_refused_and_equal_ones_count_once(tmp_path, sample):
    ms = parse_spdm(sample.report).measurements
    vbios = _signed_rim({0: [ms[1]]}, VBIOS_VERSION)[0]
    store = _test_store(tmp_path, {"a.swidtag": _signed_rim({7: [ms[8]]})[0], "b.swidtag": _signed_rim({7: [ms[8]]})[0],
                                   "vbios.swidtag": vbios})
    assert not rim_failures(sample, rim_policy(store))[0]
    (store / "b.swidtag").write_bytes(_signed_rim({7: [bytes(48)]})[0])
    failures, _ = rim_failures(sample, rim_policy(store))
    assert set(failures) == {"gpu.rim.driver"}
    assert "2 RIMs of version 550.90.07 with different reference values (a.swidtag, b.swidtag)" in \
        failures["gpu.rim.driver"].actual


def test_an_index_active_in_both_rims_is_a_conflict(tmp_path, sample):
    ms = parse_spdm(sample.report).measurements
    store = _test_store(tmp_path, {"driver.swidtag": _signed_rim({7: [ms[8]]})[0],
                                   "vbios.swidtag": _signed_rim({7: [ms[8]]}, VBIOS_VERSION)[0]})
    failures, _ = rim_failures(sample, rim_policy(store))
    assert set(failures) == {"gpu.rim.conflict"}
    assert "indices [7] active in driver.swidtag and vbios.swidtag" in failures["gpu.rim.conflict"].actual


def test_self_signed_rim_not_under_the_pinned_root_rejected(store, sample):
    ms = parse_spdm(sample.report).measurements
    xml, _ = _signed_rim({0: [ms[1]]})
    (store / "forged.swidtag").write_bytes(xml)
    failures, _ = rim_failures(sample, rim_policy(store))
    assert "pinned RIM root" in failures["gpu.rim.signature[forged.swidtag]"].actual
