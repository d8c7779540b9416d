"""`medtee eval ratings`: hashes, unblinds, prints numbers only, writes the report atomically; one line and exit 2 on
bad input; `medtee --help` stays free of the heavy evaluation libraries; the `eval` group takes further verbs."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest

from medtee import exits
from medtee.cli import main
from medtee.crypto.hpke import load_public_key
from medtee.evaluation.cli import add_parser
from medtee.evaluation.ratings import make_blinding, seal_blinding
from medtee.evaluation.report import external_references

from .conftest import CANARY, study_rows, write_csv


@pytest.fixture
def study(tmp_path, study_keys):
    blinding = make_blinding([f"q{i:03d}" for i in range(20)], seed=21)
    sealed = tmp_path / "blinding.sealed"
    seal_blinding(blinding, load_public_key(study_keys["public"]), sealed)
    ratings = write_csv(tmp_path / "ratings.csv", study_rows(blinding))
    return {"ratings": ratings, "blinding": str(sealed), "key": str(study_keys["private"]), "dir": tmp_path,
            "blinding_map": blinding}


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["eval", "ratings", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_json_summary_and_report(study, capsys):
    report = study["dir"] / "report.html"
    code, out, err = _run(capsys, study["ratings"], "--blinding", study["blinding"], "--key", study["key"],
                          "--out", str(report), "--json", "--seed", "3")
    assert code == exits.OK, err
    summary = json.loads(out[:out.rindex("}") + 1])
    assert (summary["n_items"], summary["n_raters"], summary["n_ratings"]) == (20, 3, 120)
    assert out.rstrip().endswith(f"report written to {report}")
    page = report.read_bytes()
    assert external_references(page) == [] and summary["ratings_sha256"].encode() in page
    assert not list(study["dir"].glob(".report.html.*"))  # no temporary left behind
    for text in (out, err, page.decode()):
        assert "CANARY" not in text and "chest" not in text


def test_text_summary_is_numbers_and_names(study, capsys):
    code, out, _ = _run(capsys, study["ratings"], "--blinding", study["blinding"], "--key", study["key"])
    assert code == exits.OK
    assert out.splitlines()[0].startswith("ratings sha256 ") and "alpha interval" in out and CANARY not in out


@pytest.mark.parametrize("problem", ["bad cell", "wrong key", "missing ratings", "missing key", "too few items",
                                     "ratings as blinding", "unrated item", "negative seed"])
def test_bad_input_is_one_line_and_exit_2(study, study_keys, capsys, problem):
    args = {"ratings": study["ratings"], "blinding": study["blinding"], "key": study["key"], "extra": []}
    if problem == "bad cell":
        args["ratings"] = write_csv(study["dir"] / "bad.csv", ["r1,q000,A,5,3,3,3,", f"r1,q000,B,{CANARY},3,3,3,"])
    elif problem == "wrong key":
        args["key"] = str(study_keys["other_private"])
    elif problem == "missing ratings":
        args["ratings"] = str(study["dir"] / "absent.csv")
    elif problem == "missing key":
        args["key"] = str(study["dir"] / "absent.key")
    elif problem == "too few items":
        args["extra"] = ["--min-items", "21"]
    elif problem == "unrated item":
        args["ratings"] = write_csv(study["dir"] / "part.csv", [r for r in study_rows(study["blinding_map"])
                                                               if ",q007," not in r])
    elif problem == "negative seed":
        args["extra"] = ["--seed", "-1"]
    else:
        args["blinding"] = study["ratings"]
    code, out, err = _run(capsys, args["ratings"], "--blinding", args["blinding"], "--key", args["key"],
                          *args["extra"])
    assert code == exits.BAD_INPUT
    assert out == "" and err.startswith("medtee: eval ratings: ") and err.count("\n") == 1, err
    assert "Traceback" not in err and "CANARY" not in err
    if problem == "bad cell":
        assert "line 3, column recommendation" in err
    if problem == "unrated item":
        assert "1 of the blinding's 20 items have no rating (item_id q007)" in err
    if problem == "negative seed":
        assert err == "medtee: eval ratings: --seed -1: give a seed of 0 or more\n"


def test_help_imports_no_heavy_evaluation_library():
    code = ("import sys\nfrom medtee.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "heavy = [m for m in ('scipy', 'matplotlib', 'sacrebleu', 'rouge_score', 'nltk') if m in sys.modules]\n"
            "print(heavy, file=sys.stderr)\nsys.exit(bool(heavy))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "eval" in res.stdout


def test_the_eval_group_takes_further_verbs():
    parser = argparse.ArgumentParser(prog="medtee")
    verbs = add_parser(parser.add_subparsers(dest="command"))
    verbs.add_parser("run").set_defaults(handler="run-handler")
    assert parser.parse_args(["eval", "run"]).handler == "run-handler"
    assert parser.parse_args(["eval", "ratings", "r.csv", "--blinding", "b", "--key", "k"]).seed == 0
