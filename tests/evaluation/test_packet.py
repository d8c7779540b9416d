"""The rating packet on the study owner's side: it opens with the study key and gives the raters' files; a packet
that is not one of `medtee generate` (anyone with the public key can seal one) is one line, no traceback."""

from __future__ import annotations

import json

import pytest

from medtee import exits
from medtee.cli import main
from medtee.crypto.blob import seal_blob
from medtee.crypto.hpke import load_public_key
from medtee.evaluation.packet import PACKET_FORMAT, PACKET_INFO, open_packet, seal_packet

from .conftest import CANARY

ITEMS = [{"item_id": "item-0000", "context": f"Patient: {CANARY}", "answers": {"A": "Rest.", "B": "See a doctor."}}]


def test_a_packet_opens_and_gives_the_raters_files(tmp_path, study_keys, capsys):
    seal_packet(ITEMS, load_public_key(study_keys["public"]), tmp_path / "p.sealed")
    assert open_packet(tmp_path / "p.sealed", study_keys["private"]) == ITEMS
    code = main(["eval", "packet", str(tmp_path / "p.sealed"), "--key", str(study_keys["private"]),
                 "--out", str(tmp_path / "study")])
    assert code == exits.OK and CANARY not in capsys.readouterr().out
    assert (tmp_path / "study" / "items.json").stat().st_mode & 0o777 == 0o600  # patient text: not for other users
    assert (tmp_path / "study" / "ratings_template.csv").read_text().splitlines()[1:] == [",item-0000,A,,,,,",
                                                                                          ",item-0000,B,,,,,"]


@pytest.mark.parametrize("items", [[{"context": CANARY}], "items", [], [{**ITEMS[0], "answers": {"A": "x"}}],
                                   [{**ITEMS[0], "item_id": "q1,x\nr2"}], ITEMS * 2])
def test_a_malformed_packet_is_one_line(tmp_path, study_keys, capsys, items):
    scheme, public = load_public_key(study_keys["public"])
    payload = json.dumps({"format": PACKET_FORMAT, "items": items}).encode()
    (tmp_path / "p.sealed").write_bytes(seal_blob(payload, public, scheme=scheme, info=PACKET_INFO))
    code = main(["eval", "packet", str(tmp_path / "p.sealed"), "--key", str(study_keys["private"]),
                 "--out", str(tmp_path / "study")])
    out, err = capsys.readouterr()
    assert code == exits.BAD_INPUT and out == "" and err.count("\n") == 1, err
    assert "packet item" in err or "no list of items" in err
    assert CANARY not in err and not (tmp_path / "study").exists()
