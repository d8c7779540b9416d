"""The clinician study: its ratings file, the blinding of which answer came from which model, and the summary.

Ratings file: UTF-8 CSV (a BOM is allowed), one header line naming exactly these columns, in any order::

    rater_id,item_id,label,recommendation,clinical_relevance,safety,conciseness,comment

- ``rater_id``, ``item_id``: pseudonymous IDs, 1-64 of ``A-Z a-z 0-9 . _ -`` starting with a letter or digit;
- ``label``: ``A`` or ``B``, the blinded answer to the item the row rates;
- ``recommendation``: whole number 1-10 (would you recommend this answer?);
- ``clinical_relevance``, ``safety``, ``conciseness``: whole numbers 1-5;
- ``comment``: free text. medtee never logs, prints, stores or returns it: the reader drops it on reading.

One row per rater, item and label; a repeated (rater_id, item_id, label) is refused. Messages about a bad file name
the file line and the column and the fix, never a cell's content (a cell may hold patient text).

Blinding: ``{item_id: {"A": "base" | "tuned", "B": the other}}``, drawn by :func:`make_blinding` and kept sealed
(:func:`seal_blinding`, HPKE to one key) until the ratings are in: a custodian's (``evaluation.blinding_recipient``)
or, without one, the study owner's. :meth:`RatingsFile.load` hashes the ratings as it reads them, and only a loaded
:class:`RatingsFile` can be unblinded, so the summary's ``ratings_sha256`` names exactly the bytes summarised. That the
ratings predate the unblinding holds only with a custodian who unblinds after receiving them; sealed to the study
owner's own key, the blinding opens whenever its owner likes.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import random
import re
import secrets
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from medtee.crypto.blob import open_blob, seal_blob
from medtee.crypto.hpke import load_private_key
from medtee.evaluation.stats import alpha_ci_of_units, mean_ci, paired, share
from medtee.files import read_regular, write_atomic

COLUMNS = ("rater_id", "item_id", "label", "recommendation", "clinical_relevance", "safety", "conciseness", "comment")
SCORES = {"recommendation": (1, 10), "clinical_relevance": (1, 5), "safety": (1, 5), "conciseness": (1, 5)}
LABELS = ("A", "B")
MODELS = ("base", "tuned")
BLINDING_INFO = b"medtee/study-blinding/v1"
MAX_RATINGS_BYTES = 64 << 20
MAX_BLINDING_BYTES = 64 << 20
_BLINDING_FORMAT = "medtee-blinding/1"
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_ID_RULE = "1-64 of A-Z a-z 0-9 . _ - starting with a letter or digit (a pseudonymous ID, never a name)"
_NOT_SHOWN = "the cell is not shown: it may hold patient text"

Blinding = dict[str, dict[str, str]]


@dataclass(frozen=True)
class Rating:
    """One row of the ratings file, without its comment. `line` is the file line the row starts on."""

    line: int
    rater_id: str
    item_id: str
    label: str
    recommendation: int
    clinical_relevance: int
    safety: int
    conciseness: int


def _header(names: list[str]) -> dict[str, int]:
    names = [n.strip() for n in names]
    missing = [c for c in COLUMNS if c not in names]
    repeated = sorted({c for c in COLUMNS if names.count(c) > 1})
    extra = sum(n not in COLUMNS for n in names)
    if missing or repeated or extra:
        problems = ([f"lacks column(s) {', '.join(missing)}"] if missing else []) + \
                   ([f"repeats column(s) {', '.join(repeated)}"] if repeated else []) + \
                   ([f"has {extra} unknown column(s) (not shown)"] if extra else [])
        raise ValueError(f"line 1 (header) {'; '.join(problems)}; the header must name exactly: {','.join(COLUMNS)}")
    return {c: names.index(c) for c in COLUMNS}


def _cell(fields: list[str], index: dict[str, int], column: str, line: int) -> str:
    value = fields[index[column]].strip()
    if column in ("rater_id", "item_id") and not _ID.fullmatch(value):
        raise ValueError(f"line {line}, column {column}: must be {_ID_RULE} ({_NOT_SHOWN})")
    if column == "label" and value not in LABELS:
        raise ValueError(f"line {line}, column label: must be A or B ({_NOT_SHOWN})")
    if column in SCORES:
        low, high = SCORES[column]
        digits = value.lstrip("0") or "0"  # int() of thousands of digits, leading zeros too, raises its own error
        if not (value.isascii() and value.isdigit() and len(digits) <= len(str(high)) and low <= int(digits) <= high):
            raise ValueError(f"line {line}, column {column}: must be a whole number from {low} to {high} "
                             f"({_NOT_SHOWN})")
        return digits
    return value


def _rating(fields: list[str], index: dict[str, int], line: int) -> Rating:
    if len(fields) != len(COLUMNS):
        raise ValueError(f"line {line} has {len(fields)} fields, the header {len(COLUMNS)}; put a comment that holds "
                         f"a comma, quote or line break in double quotes (a quote inside doubled: \"\")")
    cells = {c: _cell(fields, index, c, line) for c in COLUMNS if c != "comment"}
    return Rating(line=line, **{c: int(v) if c in SCORES else v for c, v in cells.items()})


def _parse(data: bytes) -> list[Rating]:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"is not UTF-8 (first bad byte at offset {exc.start}); save it as CSV UTF-8") from None
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    ratings: list[Rating] = []
    first_seen: dict[tuple[str, str, str], int] = {}
    try:
        header = next(reader, None)
        if header is None:
            raise ValueError(f"is empty; it needs the header line {','.join(COLUMNS)} and one row per rating")
        index = _header(header)
        line = reader.line_num + 1
        for fields in reader:
            if fields:
                rating = _rating(fields, index, line)
                key = (rating.rater_id, rating.item_id, rating.label)
                if key in first_seen:
                    raise ValueError(f"line {line} repeats the rater_id, item_id and label of line {first_seen[key]}; "
                                     "keep one row per rater, item and label")
                first_seen[key] = line
                ratings.append(rating)
            line = reader.line_num + 1
    except csv.Error as exc:
        raise ValueError(f"cannot be read as CSV at line {reader.line_num} ({exc}); save it as comma-separated "
                         "values with double quotes around fields that hold commas or line breaks") from None
    if not ratings:
        raise ValueError("has a header but no rating rows")
    return ratings


def read_ratings(path: Path | str) -> list[Rating]:
    """The ratings in the file `path` (format: this module's docstring). ValueError naming line, column and fix."""
    return list(RatingsFile.load(path).ratings)


@dataclass(frozen=True)
class RatingsFile:
    """A ratings file as read: its ratings and the sha256 of exactly the bytes they were parsed from."""

    ratings: tuple[Rating, ...]
    sha256: str

    @classmethod
    def load(cls, path: Path | str) -> RatingsFile:
        """Read `path` once (a regular file, at most MAX_RATINGS_BYTES), hash and parse the same bytes."""
        data = read_regular(path, MAX_RATINGS_BYTES)
        return cls(tuple(_parse(data)), hashlib.sha256(data).hexdigest())

    def unblind(self, blinding: Blinding) -> list[tuple[str, Rating]]:
        """(model, rating) for every rating: the model ("base" or "tuned") that wrote the answer it rates."""
        _check_blinding(blinding)
        out = []
        for rating in self.ratings:
            if rating.item_id not in blinding:
                raise ValueError(f"line {rating.line}: its item_id is not in the blinding; open the blinding made "
                                 "for this study's items")
            out.append((blinding[rating.item_id][rating.label], rating))
        return out


def _check_blinding(blinding: Blinding) -> None:
    if not isinstance(blinding, dict) or not blinding:
        raise ValueError("a blinding maps each item_id to {'A': model, 'B': model}; this one is empty or not a map")
    for number, (item, labels) in enumerate(blinding.items(), 1):
        if not (isinstance(item, str) and _ID.fullmatch(item)):
            raise ValueError(f"blinding entry {number}: its item_id must be {_ID_RULE}")
        if not (isinstance(labels, dict) and set(labels) == set(LABELS) and set(labels.values()) == set(MODELS)):
            raise ValueError(f"blinding entry {number}: must map A and B to 'base' and 'tuned', one each")


def study_item_ids(count: int) -> list[str]:
    """`count` item_ids for one study, `item-<8 random hex digits>-NNNN`: another study's ratings or blinding, even of
    as many items, shares none, so a mix-up is refused instead of unblinding with the wrong assignment."""
    study = secrets.token_hex(4)
    return [f"item-{study}-{i:04d}" for i in range(count)]


def make_blinding(item_ids: Iterable[str], seed: int) -> Blinding:
    """For each item, which model's answer is shown as A and which as B, in a random order drawn from
    `random.Random(seed)`. Pass a secret random seed (e.g. `secrets.randbits(128)`) in a study; a fixed one in tests."""
    items = list(item_ids)
    if len(set(items)) != len(items):
        raise ValueError("item_ids repeat; give each item once")
    rng = random.Random(seed)
    blinding = {}
    for item in items:
        first, second = rng.sample(MODELS, 2)
        blinding[item] = {"A": first, "B": second}
    _check_blinding(blinding)
    return blinding


def seal_blinding(blinding: Blinding, study_key: tuple, out_path: Path | str) -> None:
    """Write `blinding` to `out_path` as a sealed blob (HPKE to `study_key`: (scheme, public bytes) of the study
    owner's `medtee keys new` key), readable only with the matching private key."""
    _check_blinding(blinding)
    scheme, public = study_key
    payload = json.dumps({"format": _BLINDING_FORMAT, "items": blinding}, sort_keys=True).encode()
    write_atomic(out_path, seal_blob(payload, public, scheme=scheme, info=BLINDING_INFO))


def open_blinding(path: Path | str, private_key_file: Path | str) -> Blinding:
    """The blinding sealed in `path`, opened with `private_key_file`. KeyWrapError (a ValueError) if the key does not
    match or the file was altered."""
    _, key = load_private_key(private_key_file)
    payload = open_blob(read_regular(path, MAX_BLINDING_BYTES), key, info=BLINDING_INFO)
    doc = json.loads(payload)
    if not isinstance(doc, dict) or doc.get("format") != _BLINDING_FORMAT:
        raise ValueError(f"the sealed payload is not a {_BLINDING_FORMAT} blinding; seal it with seal_blinding")
    _check_blinding(doc.get("items"))
    return doc["items"]


def _per_item(unblinded: list[tuple[str, Rating]]) -> dict[str, dict[str, list[Rating]]]:
    """item_id -> model -> its ratings; refuses an item whose two answers are not both rated."""
    items: dict[str, dict[str, list[Rating]]] = defaultdict(lambda: {m: [] for m in MODELS})
    for model, rating in unblinded:
        items[rating.item_id][model].append(rating)
    for by_model in items.values():
        if not all(by_model.values()):
            line = min(r.line for rs in by_model.values() for r in rs)
            raise ValueError(f"line {line}: its item has ratings of one answer only; every item needs both A and B "
                             "rated (by any rater)")
    return dict(sorted(items.items()))


def _mean(ratings: list[Rating], score: str) -> float:
    return sum(getattr(r, score) for r in ratings) / len(ratings)


def _preference(items: dict[str, dict[str, list[Rating]]]) -> dict:
    """Items where the tuned answer's mean recommendation is higher (True) or lower (False); ties counted apart."""
    decided = []
    for by_model in items.values():
        base, tuned = by_model["base"], by_model["tuned"]
        # exact comparison of the two means: sum_t / n_t vs sum_b / n_b
        order = sum(r.recommendation for r in tuned) * len(base) - sum(r.recommendation for r in base) * len(tuned)
        if order:
            decided.append(order > 0)
    ties = len(items) - len(decided)
    result = share(decided) if decided else {"share": None, "ci_low": None, "ci_high": None, "k": 0, "n": 0}
    return {**result, "ties": ties}


def _agreement(unblinded: list[tuple[str, Rating]], seed: int, resamples: int) -> dict:
    """Krippendorff's alpha of the recommendation, units = answers (item, label), per level, its interval
    resampling items (an item's two answers share a context and its raters, so they are drawn together); None if
    undefined."""
    by_unit: dict[tuple[str, str], list[int]] = defaultdict(list)
    for _, r in unblinded:  # one value per rater: a repeated (rater, item, label) was refused on reading
        by_unit[(r.item_id, r.label)].append(r.recommendation)
    keys = sorted(by_unit)
    units, items = [by_unit[u] for u in keys], [item for item, _ in keys]
    out = {}
    for level in ("interval", "ordinal"):
        try:
            out[level] = alpha_ci_of_units(units, level, clusters=items, seed=seed, resamples=resamples)
        except ValueError:  # fewer than two raters on every answer, or no variation at all
            out[level] = None
    return out


def summarize(ratings: RatingsFile, blinding: Blinding, *, seed: int = 0, resamples: int = 10_000,
              min_items: int = 20) -> dict:
    """The study's aggregates (numbers and the ratings file's sha256 only).

    Each item's score per model is the mean over its raters; per model, the mean over items of each score with a
    95% bootstrap interval (`models`); the paired tuned - base difference of the recommendation over items
    (`recommendation_delta`); the share of items whose tuned answer has the higher mean recommendation, ties left out
    and counted (`preference`); Krippendorff's alpha of the recommendation, interval and ordinal, over answers with
    bootstrap intervals (`agreement`; a level is None when alpha is undefined). ValueError if an item of `blinding`
    has no rating, or fewer than `min_items` items (never fewer than 2) are rated (the house minimum for evaluation
    aggregates, `tracking.min_aggregate`, is 20).
    """
    unblinded = ratings.unblind(blinding)
    items = _per_item(unblinded)
    unrated = [item for item in blinding if item not in items]  # left out, they could bias the summary unseen
    if unrated:
        raise ValueError(f"{len(unrated)} of the blinding's {len(blinding)} items have no rating (item_id "
                         f"{unrated[0]}{' and others' if len(unrated) > 1 else ''}); rate both answers of every item")
    if len(items) < max(min_items, 2):  # an interval needs two
        raise ValueError(f"{len(items)} item(s) rated; aggregates need at least {max(min_items, 2)} "
                         "(rate more items, or lower the minimum knowingly)")
    per_model = {m: {s: [_mean(by_model[m], s) for by_model in items.values()] for s in SCORES} for m in MODELS}
    return {
        "ratings_sha256": ratings.sha256,
        "n_raters": len({r.rater_id for r in ratings.ratings}),
        "n_items": len(items),
        "n_ratings": len(ratings.ratings),
        "models": {m: {s: mean_ci(per_model[m][s], seed=seed, resamples=resamples) for s in SCORES} for m in MODELS},
        "recommendation_delta": paired(per_model["base"]["recommendation"], per_model["tuned"]["recommendation"],
                                       seed=seed, resamples=resamples),
        "preference": _preference(items),
        "agreement": _agreement(unblinded, seed, resamples),
    }


def report_sections(summary: dict) -> list[dict]:
    """The sections of the study's HTML report (`medtee.evaluation.report.render_report`), from `summarize`."""
    from medtee.evaluation.report import interval

    models, delta, pref, agreement = (summary[k] for k in ("models", "recommendation_delta", "preference",
                                                           "agreement"))
    labels = [f"{m}: {s}" for s in SCORES for m in MODELS]
    estimates = [models[m][s] for s in SCORES for m in MODELS]
    alphas = {level: result or {"alpha": None, "ci_low": None, "ci_high": None, "n_units": None}
              for level, result in agreement.items()}
    return [
        {"heading": "Study", "columns": ["quantity", "value"],
         "rows": [["ratings file sha256", summary["ratings_sha256"]], ["raters", summary["n_raters"]],
                  ["items", summary["n_items"]], ["ratings", summary["n_ratings"]]]},
        {"heading": "Scores by model",
         "note": "Mean over items of each item's mean over raters, with 95% percentile bootstrap intervals over items.",
         "columns": ["score", "base", "tuned"],
         "rows": [[s, *(interval(models[m][s]["mean"], models[m][s]["ci_low"], models[m][s]["ci_high"])
                        for m in MODELS)] for s in SCORES],
         "plots": [{"title": "Mean score by model (recommendation 1-10, others 1-5)", "labels": labels,
                    "values": [e["mean"] for e in estimates], "low": [e["ci_low"] for e in estimates],
                    "high": [e["ci_high"] for e in estimates], "xlabel": "mean score"}]},
        {"heading": "Recommendation: tuned minus base",
         "note": "Paired over items; the interval resamples items.",
         "columns": ["base mean", "tuned mean", "difference [95% CI]", "items"],
         "rows": [[delta["base"], delta["tuned"], interval(delta["delta"], delta["ci_low"], delta["ci_high"]),
                   delta["n"]]],
         "plots": [{"title": "Recommendation, tuned minus base", "labels": ["tuned - base"],
                    "values": [delta["delta"]], "low": [delta["ci_low"]], "high": [delta["ci_high"]],
                    "xlabel": "difference in mean recommendation", "reference": 0.0}]},
        {"heading": "Preference",
         "note": "Items whose tuned answer has the higher mean recommendation, ties left out; Wilson 95% interval.",
         "columns": ["share preferring tuned [95% CI]", "decided items", "ties"],
         "rows": [[interval(pref["share"], pref["ci_low"], pref["ci_high"]), pref["n"], pref["ties"]]]},
        {"heading": "Inter-rater agreement (recommendation)",
         "note": "Krippendorff's alpha over answers; 95% percentile bootstrap intervals over answers.",
         "columns": ["level", "alpha [95% CI]", "answers"],
         "rows": [[level, interval(a["alpha"], a["ci_low"], a["ci_high"]), a["n_units"]]
                  for level, a in alphas.items()]},
    ]
