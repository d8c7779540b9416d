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
