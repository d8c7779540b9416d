"""Ratings files and study keys for the evaluation tests."""

from __future__ import annotations

import random

import pytest

from medtee.evaluation.ratings import COLUMNS

HEADER = ",".join(COLUMNS)
CANARY = "CANARY-PATIENT-Q7X2 Mrs Example has chest pain"


def write_csv(path, rows: list[str], header: str = HEADER) -> str:
    path.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    return str(path)


def study_rows(blinding: dict, raters=("r1", "r2", "r3"), seed: int = 0) -> list[str]:
    """Plausible ratings: the tuned answer scores one point higher on average; every comment holds the canary."""
    rng = random.Random(seed)
    rows = []
    for rater in raters:
        for item, labels in blinding.items():
            for label in ("A", "B"):
                bonus = labels[label] == "tuned"
                rows.append(f'{rater},{item},{label},{min(10, rng.randint(4, 8) + bonus)},{rng.randint(2, 5)},'
                            f'{rng.randint(3, 5)},{rng.randint(1, 5)},"{CANARY}, said ""no"""')
    return rows


@pytest.fixture(scope="session")
def study_keys(tmp_path_factory):
    from medtee.crypto.hpke import write_keypair

    directory = tmp_path_factory.mktemp("keys")
    write_keypair(directory, "study")
    write_keypair(directory, "other")
    return {"public": directory / "study.pub", "private": directory / "study.key",
            "other_private": directory / "other.key"}
