import hashlib

import pytest

from medtee.attestation import gpu_nonce, report_data

BASE = dict(nonce=b"n" * 32, ephemeral_public_key=b"k" * 32, recipe_digest="sha256:00ff")


def test_report_data_is_sha384_zero_padded_and_deterministic():
    rd = report_data(**BASE)
    assert len(rd) == 64 and rd[48:] == bytes(16)
    assert rd == report_data(**BASE)


def test_report_data_matches_documented_encoding():
    def field(name, value):
        return len(name).to_bytes(4, "big") + name.encode() + len(value).to_bytes(4, "big") + value

    gpu = (1).to_bytes(4, "big") + (3).to_bytes(4, "big") + b"abc"
    material = (b"medtee/report-data/v1" + field("nonce", b"n" * 32) + field("ephemeral_public_key", b"k" * 32)
                + field("recipe_digest", b"sha256:00ff") + field("gpu_evidence_digests", gpu))
    assert report_data(**BASE, gpu_evidence_digests=[b"abc"]) == hashlib.sha384(material).digest() + bytes(16)


@pytest.mark.parametrize("change", [
    dict(nonce=b"m" * 32), dict(ephemeral_public_key=b"j" * 32), dict(recipe_digest="sha256:00fe"),
    dict(gpu_evidence_digests=[b"x"]),
])
def test_every_input_changes_report_data(change):
    assert report_data(**{**BASE, **change}) != report_data(**BASE)


def test_field_boundaries_cannot_be_shifted():
    a = report_data(nonce=b"n" * 32, ephemeral_public_key=b"ab", recipe_digest="c")
    b = report_data(nonce=b"n" * 32, ephemeral_public_key=b"a", recipe_digest="bc")
    assert a != b


def test_gpu_nonce_is_32_bytes_and_tied_to_material():
    g = gpu_nonce(**BASE)
    assert len(g) == 32 and g != report_data(**BASE)[:32]
    assert g != gpu_nonce(**{**BASE, "nonce": b"m" * 32})


@pytest.mark.parametrize("bad, word", [
    (dict(nonce=b"short"), "nonce"), (dict(ephemeral_public_key=b""), "ephemeral_public_key"),
    (dict(recipe_digest=""), "recipe_digest"),
])
def test_bad_inputs_are_named(bad, word):
    with pytest.raises(ValueError, match=word):
        report_data(**{**BASE, **bad})


RECEIPT_KEY = bytes(range(32))
# REPORT_DATA (with GPU digest b"abc") and GPU nonce of BASE as the encoding was before receipt keys existed
OLD_RD = ("e157571a697abf63790855b592c19c943cd3da92aa75ff6143c899d704d1d3428cb7ba5dc5e5e83c084eb6a19ab20e6f"
          + "00" * 16)
OLD_GPU = "987fc1a68466ab3c88566bdbd15a994b3f67285648ccfbd46a74a3177cb93689"
RD_VECTOR = ("9bb875f23f6b9c8211047d2ce63b17e848a1360cc4d1994c8c108c5b12f723c8613f72b74aaa91290b45fedabf089633"
             + "00" * 16)
GPU_VECTOR = "b56336629e69da32e082072e429b1a4a5b2a0c4fc0db0d1c0a3fa5b50ff62d59"


def _field(name, value):
    return len(name).to_bytes(4, "big") + name.encode() + len(value).to_bytes(4, "big") + value


def test_receipt_key_is_one_more_field_after_recipe_digest():
    common = (_field("nonce", b"n" * 32) + _field("ephemeral_public_key", b"k" * 32)
              + _field("recipe_digest", b"sha256:00ff") + _field("receipt_public_key", RECEIPT_KEY))
    gpu = (1).to_bytes(4, "big") + (3).to_bytes(4, "big") + b"abc"
    rd = report_data(**BASE, gpu_evidence_digests=[b"abc"], receipt_public_key=RECEIPT_KEY)
    assert rd == hashlib.sha384(b"medtee/report-data/v1" + common + _field("gpu_evidence_digests", gpu)).digest() + bytes(16)
    assert gpu_nonce(**BASE, receipt_public_key=RECEIPT_KEY) == hashlib.sha256(b"medtee/gpu-nonce/v1" + common).digest()


def test_receipt_key_vectors():
    """Fixed vectors of the extended encoding (any change to it breaks every receipt already written)."""
    assert report_data(**BASE, receipt_public_key=RECEIPT_KEY).hex() == RD_VECTOR
    assert gpu_nonce(**BASE, receipt_public_key=RECEIPT_KEY).hex() == GPU_VECTOR


def test_absent_receipt_key_keeps_the_old_encoding():
    assert report_data(**BASE, gpu_evidence_digests=[b"abc"]).hex() == OLD_RD
    assert gpu_nonce(**BASE).hex() == OLD_GPU
    assert report_data(**BASE, receipt_public_key=None) == report_data(**BASE)
    assert gpu_nonce(**BASE, receipt_public_key=None) == gpu_nonce(**BASE)
    assert report_data(**BASE, receipt_public_key=RECEIPT_KEY) != report_data(**BASE)
    assert gpu_nonce(**BASE, receipt_public_key=RECEIPT_KEY) != gpu_nonce(**BASE)
    other = bytes(31) + b"\x01"
    assert report_data(**BASE, receipt_public_key=other) != report_data(**BASE, receipt_public_key=RECEIPT_KEY)


@pytest.mark.parametrize("bad", [b"", b"k" * 31, b"k" * 33, "k" * 32])
def test_receipt_key_must_be_32_raw_bytes(bad):
    with pytest.raises(ValueError, match="receipt_public_key"):
        report_data(**BASE, receipt_public_key=bad)
    with pytest.raises(ValueError, match="receipt_public_key"):
        gpu_nonce(**BASE, receipt_public_key=bad)
