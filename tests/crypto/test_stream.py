"""The checkpoint stream cipher: format 2 (Cobblestone-256) written and read, format 1 (written before, golden/)
still read, every kind of tampering detected in both, unknown formats refused by name, keys bound to the dataset."""

from __future__ import annotations

import os

import pytest

from medtee.crypto import stream

KEY = stream.derive_key(b"\x01" * 32, "a" * 64)
V1 = "step-0000007-v1.ckpt.enc"  # written by medtee.training.checkpoint (format 1, 1000-byte segments) before the move


def test_the_key_is_bound_to_the_dataset_and_stays_what_it_was():
    assert KEY.hex() == "3a422b3de09f1025815aa7e5af14c3603331abf6e360f2d721d786ced2133c7d"  # what format 1 used
    assert stream.derive_key(b"\x01" * 32, "b" * 64) != KEY


@pytest.mark.parametrize("size", [0, 1, 16 * 1024, 200_000])
def test_format_2_round_trip(size):
    plaintext = os.urandom(size)
    blob = stream.encrypt(plaintext, KEY)
    assert blob.startswith(stream.MAGIC) and blob.startswith(b"MEDTEE-CKPT/2\n")
    assert stream.decrypt(blob, KEY, name="f") == plaintext
    assert stream.encrypt(plaintext, KEY) != blob  # a fresh nonce per file


def _v2_tampered(blob: bytes, how: str) -> bytes:
    body = len(stream.MAGIC)
    if how == "flip":
        return blob[:len(blob) // 2] + bytes([blob[len(blob) // 2] ^ 1]) + blob[len(blob) // 2 + 1:]
    if how == "truncate":  # cut at a chunk boundary (16 KiB + tag): the new last chunk was not sealed as last
        return blob[:body + 56 + 2 * (16 * 1024 + 16)]
    if how == "swap":  # chunks 0 and 1 exchanged
        start, n = body + 56, 16 * 1024 + 16
        return blob[:start] + blob[start + n:start + 2 * n] + blob[start:start + n] + blob[start + 2 * n:]
    if how == "as-v1":  # the same bytes relabelled as format 1
        return stream.MAGIC_V1 + blob[body:]
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["flip", "truncate", "swap", "as-v1"])
def test_format_2_tampering_is_detected(how):
    blob = stream.encrypt(os.urandom(100_000), KEY)
    with pytest.raises(stream.StreamError, match="x.ckpt.enc cannot be decrypted"):
        stream.decrypt(_v2_tampered(blob, how), KEY, name="x.ckpt.enc")


def test_another_dataset_key_cannot_open_either_format(golden):
    other = stream.derive_key(b"\x01" * 32, "b" * 64)
    for blob in (stream.encrypt(b"state", KEY), (golden / V1).read_bytes()):
        with pytest.raises(stream.StreamError, match="another sealed dataset"):
            stream.decrypt(blob, other, name="y")


def test_an_earlier_key_opens_what_it_wrote_and_a_rotation_is_named_as_a_cause():
    """A file under an earlier derivation's key opens through `earlier`; one no key opens names the old derivation
    and `medtee keys rotate` among its causes (it said only "another sealed dataset")."""
    data_key = b"\x02" * 32
    blob = stream.encrypt(b"state", stream.derive_key(data_key, "a" * 64))
    now = stream.derive_key(data_key, "c" * 64)
    assert stream.decrypt(blob, now, name="z", earlier=(stream.derive_key(data_key, "a" * 64),)) == b"state"
    with pytest.raises(stream.StreamError, match=r"by a medtee before 2026-12 before `medtee keys rotate`"):
        stream.decrypt(blob, now, name="z", earlier=(stream.derive_key(data_key, "b" * 64),))


def test_format_1_written_before_still_opens(golden):
    import io

    import torch

    state = torch.load(io.BytesIO(stream.decrypt((golden / V1).read_bytes(), KEY, name=V1)), weights_only=False)
    assert state["global_step"] == 7 and state["medtee"]["run_info"] == {"mlflow_run_id": "abc"}
    assert torch.equal(state["state_dict"]["lora_A"], torch.arange(2000, dtype=torch.float32))


def _v1_tampered(blob: bytes, how: str) -> bytes:
    head = len(stream.MAGIC_V1) + 8
    first = int.from_bytes(blob[head:head + 4], "big") + 4
    if how == "flip":
        return blob[:len(blob) // 2] + bytes([blob[len(blob) // 2] ^ 1]) + blob[len(blob) // 2 + 1:]
    if how == "truncate":  # drop all but the first segment: it was not sealed as last
        return blob[:head + first]
    if how == "swap":  # segments 0 and 1 exchanged
        second = int.from_bytes(blob[head + first:head + first + 4], "big") + 4
        return blob[:head] + blob[head + first:head + first + second] + blob[head:head + first] + \
            blob[head + first + second:]
    if how == "as-v2":
        return stream.MAGIC + blob[len(stream.MAGIC_V1):]
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["flip", "truncate", "swap", "as-v2"])
def test_format_1_tampering_is_detected(golden, how):
    with pytest.raises(stream.StreamError, match="v1.ckpt.enc cannot be decrypted"):
        stream.decrypt(_v1_tampered((golden / V1).read_bytes(), how), KEY, name=V1)


def test_not_a_checkpoint_and_an_unknown_format_are_refused_by_name():
    with pytest.raises(stream.StreamError, match="plain.ckpt is not a medtee encrypted checkpoint"):
        stream.decrypt(b"PK\x03\x04 a zip", KEY, name="plain.ckpt")
    with pytest.raises(stream.StreamError, match="new.ckpt.enc is a medtee encrypted checkpoint of format '3'.*formats "
                                                 "1 and 2"):
        stream.decrypt(b"MEDTEE-CKPT/3\n" + os.urandom(100), KEY, name="new.ckpt.enc")
    with pytest.raises(stream.StreamError, match="cannot be decrypted"):
        stream.decrypt(stream.MAGIC, KEY, name="empty")
