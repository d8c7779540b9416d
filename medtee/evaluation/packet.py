"""The clinician study's rating packet: for each sampled held-out item, the context and the two answers (base and
tuned) under labels A and B in a random order per item. It holds patient text, so it exists only encrypted to the
study owner's key (`medtee keys new`); which label is which model (the blinding) is sealed separately, and opened
only after the ratings are in (`medtee eval ratings`)."""

from __future__ import annotations

import json
from pathlib import Path

from medtee.crypto.blob import open_blob, seal_blob
from medtee.crypto.hpke import load_private_key
from medtee.files import read_regular, write_atomic

PACKET_INFO = b"medtee/rating-packet/v1"
PACKET_FORMAT = "medtee-rating-packet/1"
PACKET_FILE, BLINDING_FILE = "rating_packet.sealed", "blinding.sealed"
MAX_PACKET_BYTES = 256 << 20
TEMPLATE_COLUMNS = ("rater_id", "item_id", "label", "recommendation", "clinical_relevance", "safety", "conciseness",
                    "comment")


def seal_packet(items: list[dict], study_key: tuple, out_path: Path | str) -> None:
    """Write `items` ({item_id, context, answers: {A, B}}) encrypted to the study owner's public key (`study_key`:
    (scheme, public bytes), read before the key release)."""
    scheme, public = study_key
    payload = json.dumps({"format": PACKET_FORMAT, "items": items}, sort_keys=True, ensure_ascii=False).encode()
    write_atomic(out_path, seal_blob(payload, public, scheme=scheme, info=PACKET_INFO))


def open_packet(path: Path | str, private_key_file: Path | str) -> list[dict]:
    """The items of a sealed packet, opened with the study owner's private key (KeyWrapError with any other)."""
    _, key = load_private_key(private_key_file)
    doc = json.loads(open_blob(read_regular(path, MAX_PACKET_BYTES), key, info=PACKET_INFO))
    if not isinstance(doc, dict) or doc.get("format") != PACKET_FORMAT:
        raise ValueError(f"not a {PACKET_FORMAT} packet; give the rating_packet.sealed of `medtee generate`")
    _check_items(doc.get("items"))
    return doc["items"]


def _check_items(items) -> None:
    """Each item {item_id, context, answers: {A, B}} with text values and a valid, unique item_id (no text shown)."""
    from medtee.evaluation.ratings import _ID, _ID_RULE

    if not isinstance(items, list) or not items:
        raise ValueError("the packet holds no list of items; give the rating_packet.sealed of `medtee generate`")
    seen = set()
    for number, item in enumerate(items, 1):
        if not (isinstance(item, dict) and set(item) == {"item_id", "context", "answers"}
                and isinstance(item["context"], str) and isinstance(item["answers"], dict)
                and set(item["answers"]) == {"A", "B"} and all(isinstance(a, str) for a in item["answers"].values())):
            raise ValueError(f"packet item {number} is not {{item_id, context, answers: {{A, B}}}} of text")
        if not (isinstance(item["item_id"], str) and _ID.fullmatch(item["item_id"])) or item["item_id"] in seen:
            raise ValueError(f"packet item {number}: its item_id must be unique and {_ID_RULE}")
        seen.add(item["item_id"])


def write_for_raters(items: list[dict], out_dir: Path) -> tuple[Path, Path]:
    """On the study owner's machine: the items for the raters (items.json, patient text: readable by its owner only)
    and an empty ratings sheet (ratings_template.csv, one row per item and label, in the format `medtee eval ratings`
    reads)."""
    import csv
    import io

    out_dir.mkdir(parents=True, exist_ok=True)
    sheet = io.StringIO()
    writer = csv.writer(sheet, lineterminator="\n")
    writer.writerow(TEMPLATE_COLUMNS)
    for item in items:
        for label in ("A", "B"):
            writer.writerow(["", item["item_id"], label, "", "", "", "", ""])
    items_path, sheet_path = out_dir / "items.json", out_dir / "ratings_template.csv"
    write_atomic(items_path, json.dumps(items, indent=2, ensure_ascii=False).encode(), mode=0o600)  # patient text
    write_atomic(sheet_path, sheet.getvalue().encode())
    return items_path, sheet_path
