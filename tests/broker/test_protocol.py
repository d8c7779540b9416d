"""Request validation: bounded JSON, exact fields, digests, base64 sizes; messages never repeat a value."""

from __future__ import annotations

import base64

import pytest

from medtee.broker.protocol import (
    MAX_CERTIFICATES,
    MAX_JSON_DEPTH,
    RequestError,
    check_digest,
    decode_b64,
    parse_challenge_request,
    parse_json,
    parse_release_request,
)

MARK = "LEAK-MARKER"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _release(**changes) -> dict:
    doc = {"dataset_id": "ds-1", "nonce": _b64(b"n" * 32), "ephemeral_public_key": _b64(b"k" * 32),
           "evidence": {"provider": "simulated", "simulated": True, "snp_report": _b64(b"r" * 1184),
                        "certificates": [_b64(b"c" * 500)], "gpus": [{"report": _b64(b"g" * 100), "cc_feature": True}]},
           "recipe_digest": "ab" * 32, "manifest_digest": "cd" * 32}
    return {**doc, **changes}


def test_json_depth_and_size_are_bounded_without_recursion():
    assert parse_json(("[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH).encode())
    assert parse_json(b'["[[[[[[[[[[[[[[[[[[[[[[[[\\"[[[[[[[[[[[[[[[["]')  # brackets inside strings do not nest
    assert parse_json(b'["' + b'\\"' * 60_000 + b'"]')  # escaped quotes are not strings
    for body, problem in [(b"[" * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1), "nested"),
                          (b"[" * 100_000, "nested"), (b"[" + b"0," * 200_000 + b"0]", "too many JSON values"),
                          (b"\xff\xfe", "UTF-8"), (b"{'a': 1}", "not valid JSON"), (b"1" * 5000, "not valid JSON"),
                          # floods the scan for strings used to walk one match at a time (seconds for 4 MiB)
                          (b'"' * (4 << 20), "over 262145 strings"), (b'"' + b"\\" * (2 << 20) + b'"', "escapes"),
                          (b"[" + b'"a",' * 300_000 + b'"a"]', "over 262145 strings")]:
        with pytest.raises(RequestError, match=problem):
            parse_json(body)


def test_a_valid_release_request_parses():
    fields = parse_release_request(_release())
    assert fields["nonce"] == b"n" * 32 and fields["evidence"].gpus[0].cc_feature is True
    assert fields["evidence"].certificates == (b"c" * 500,)


@pytest.mark.parametrize("changes, problem", [
    ({"recipe_digest": MARK + "a" * 64}, "recipe_digest must be 64 lowercase hex"),
    ({"manifest_digest": "AB" * 32}, "manifest_digest must be 64 lowercase hex"),
    ({"recipe_digest": "sha256:" + "ab" * 32}, "recipe_digest"),
    ({"dataset_id": "../" + MARK}, "dataset_id: dataset id must be"),
    ({"nonce": _b64(b"short")}, "nonce must be base64 of 16 to 64 bytes"),
    ({"nonce": MARK + "!"}, "nonce must be base64"),
    ({"ephemeral_public_key": "A" * 100_000}, "ephemeral_public_key must be base64"),
    ({"evidence": {"provider": MARK * 10, "snp_report": "AAAA"}}, "evidence.provider"),
    ({"evidence": {"provider": "x", "snp_report": "AAAA", MARK: 1}}, "evidence: unknown field"),
    ({"evidence": {"provider": "x", "snp_report": "AAAA", "certificates": ["AAAA"] * (MAX_CERTIFICATES + 1)}},
     "evidence.certificates must be a list of at most"),
    ({"evidence": {"provider": "x", "snp_report": "AAAA", "gpus": [{"report": "AAAA", "cc_feature": 1}]}},
     r"evidence.gpus\[0\]: cc_feature"),
    ({"evidence": {"provider": "x", "snp_report": "AAAA", "gpus": [{"report": _b64(b"x" * 70_000)}]}},
     r"evidence.gpus\[0\].report must be base64"),
    ({MARK: "x"}, "unknown field"),
])
def test_a_malformed_release_request_names_the_field_never_the_value(changes, problem):
    with pytest.raises(RequestError, match=problem) as err:
        parse_release_request(_release(**changes))
    assert MARK not in str(err.value)
    assert set(err.value.fields) == set(_release()) - set(changes)  # the fields that passed, for the audit log


def test_missing_fields_and_other_shapes():
    with pytest.raises(RequestError, match="missing field nonce"):
        parse_release_request({k: v for k, v in _release().items() if k != "nonce"})
    for doc in ([], "x", None):
        with pytest.raises(RequestError, match="must be a JSON object"):
            parse_release_request(doc)
        with pytest.raises(RequestError, match="must be a JSON object"):
            parse_challenge_request(doc)
    assert parse_challenge_request({"dataset_id": "ds-1"}) == "ds-1"
    with pytest.raises(RequestError, match="unknown field"):
        parse_challenge_request({"dataset_id": "ds-1", "x": 1})


def test_digest_and_base64_rules():
    assert check_digest("0f" * 32, "d") == "0f" * 32
    for bad in ("0f" * 31, "0f" * 32 + "\n", "0F" * 32, 12, None):
        with pytest.raises(RequestError):
            check_digest(bad, "d")
    assert decode_b64(_b64(b"abc"), "f", 3) == b"abc"
    for bad in (_b64(b"abcd"), "", "a b c", 7, "é" * 4):
        with pytest.raises(RequestError):
            decode_b64(bad, "f", 3)


def test_an_unterminated_string_of_escaped_quotes_is_refused_in_linear_time():
    """A regex over the strings was quadratic here (a 256 KiB body took minutes, holding the GIL): one pass now."""
    from medtee.broker.protocol import RequestError, parse_json

    with pytest.raises(RequestError, match="not valid JSON"):
        parse_json(('"' + '\\"' * 60_000).encode())  # the quadratic scan would take minutes
    with pytest.raises(RequestError, match="more than 65536 backslash escapes"):
        parse_json(('"' + '\\"' * 500_000).encode())  # counted before any scan
    assert parse_json(b'{"a": "x\\\\", "b": [1, {"c": "]]]{{{"}]}') == {"a": "x\\", "b": [1, {"c": "]]]{{{"}]}
