"""The HTML report: byte-identical for identical input, no external reference, no shared 8-gram with the evaluation
texts, a restrictive CSP, and a real render in headless Chromium (screenshot in tests/artifacts/)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from medtee.evaluation.ratings import RatingsFile, make_blinding, report_sections, summarize
from medtee.evaluation.report import CSP, external_references, render_report, shared_ngrams

from .conftest import CANARY, study_rows, write_csv

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
TEXTS = ["The patient reports chest pain radiating to the left arm since this morning after climbing stairs",
         f"{CANARY} and was advised to rest and take paracetamol every six hours with water"]


@pytest.fixture(scope="module")
def page(tmp_path_factory) -> bytes:
    blinding = make_blinding([f"q{i:03d}" for i in range(24)], seed=3)
    path = write_csv(tmp_path_factory.mktemp("study") / "r.csv", study_rows(blinding))
    summary = summarize(RatingsFile.load(path), blinding, seed=0, resamples=1000)
    return render_report("Clinician study: tuned vs base", report_sections(summary))


def _render_in_subprocess(sections_code: str) -> bytes:
    code = ("import sys; from medtee.evaluation.report import render_report; "
            f"sys.stdout.buffer.write(render_report('T', {sections_code}))")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, check=True, timeout=120).stdout


SECTIONS = ("[{'heading': 'H', 'columns': ['a', 'b'], 'rows': [[1.5, None]], 'plots': [{'title': 'p', "
            "'labels': ['x', 'y'], 'values': [1.0, 2.0], 'low': [0.5, None], 'high': [1.5, None], 'xlabel': 'v', "
            "'reference': 0.0}]}]")


def test_identical_input_gives_identical_bytes_across_processes():
    first = _render_in_subprocess(SECTIONS)
    assert first == _render_in_subprocess(SECTIONS) == render_report("T", eval(SECTIONS))
    assert b"<svg" in first and b"n/a" in first and b"1.500" in first


def test_the_study_report_is_self_contained(page):
    assert f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'.encode() in page
    assert CSP.startswith("default-src 'none';")
    assert external_references(page) == []
    for banned in (b"<script", b"<link", b"<iframe", b"@import", b"http://", b"https://", b"<!DOCTYPE svg"):
        assert banned not in page
    assert page.count(b"<svg") == 2
    assert shared_ngrams(page.decode(), TEXTS) == []
    assert b"CANARY" not in page


def test_text_is_escaped():
    page = render_report("<script>alert(1)</script>", [{"heading": "<img src=https://x>", "columns": ["c"],
                                                        "rows": [["<a href='https://y'>"]]}])
    assert external_references(page) == [] and b"<script>" not in page


@pytest.mark.parametrize("snippet, found", [
    ('<script src="x.js"></script>', ["<script>", "<script src=x.js>"]),
    ("<script>1</script>", ["<script>"]),
    ('<link rel="stylesheet" href="https://cdn.example/s.css">', ["<link>", "<link href=https://cdn.example/s.css>"]),
    ('<img src="https://example.org/a.png">', ["<img src=https://example.org/a.png>"]),
    ('<a href="https://example.org">x</a>', ["<a href=https://example.org>"]),
    ('<iframe src="about:blank"></iframe>', ["<iframe>", "<iframe src=about:blank>"]),
    ('<div style="background:url(https://e.org/b.png)">', ["<div style>: url(https://e.org/b.png)"]),
    ("<style>@import 'x.css';</style>", ["<style>: @import"]),
    ("<style>body{background:url('//e.org/x')}</style>", ["<style>: url(//e.org/x)"]),
    ('<svg><use xlink:href="https://e.org/s.svg#a"/></svg>', ["<use xlink:href=https://e.org/s.svg#a>"]),
    ('<meta http-equiv="refresh" content="0; url=https://e.org">', ["<meta http-equiv=refresh>"]),
])
def test_external_references_finds_what_a_browser_would_fetch(snippet, found):
    assert external_references(f"<html><body>{snippet}</body></html>".encode()) == found


def test_fragments_and_data_uris_are_local():
    page = ('<a href="#top">t</a><img src="data:image/png;base64,iVBORw0KGgo="><svg><use xlink:href="#m1"/>'
            '<g clip-path="url(#c1)"></g></svg><style>.a{background:url(data:image/png;base64,AA==)}</style>')
    assert external_references(page.encode()) == []


def test_shared_ngrams_finds_an_eight_word_quote_case_insensitively():
    page = render_report("T", [{"heading": "Findings", "note": "we saw: CHEST PAIN radiating to the left arm since "
                                "this morning.", "columns": ["c"], "rows": [["x"]]}])
    assert shared_ngrams(page.decode(), TEXTS) == ["chest pain radiating to the left arm since",
                                                   "pain radiating to the left arm since this",
                                                   "radiating to the left arm since this morning"]
    seven = render_report("T", [{"heading": "chest pain radiating to the left arm", "columns": ["c"], "rows": []}])
    assert shared_ngrams(seven.decode(), TEXTS) == []
    assert shared_ngrams(seven.decode(), TEXTS, n=7) == ["chest pain radiating to the left arm"]


def test_shared_ngrams_reads_plot_text_and_ignores_styles():
    sections = [{"heading": "H", "columns": ["c"], "rows": [], "plots": [{
        "title": "the patient reports chest pain radiating to the", "labels": ["left arm since this"],
        "values": [1.0], "low": [0.0], "high": [2.0], "xlabel": "x"}]}]
    assert shared_ngrams(render_report("T", sections).decode(), TEXTS) != []
    assert shared_ngrams("<style>the patient reports chest pain radiating to the left</style>", TEXTS) == []


@pytest.mark.parametrize("sections, words", [
    ([{"heading": "H", "rows": []}], "must be a dict with heading, columns, rows"),
    ([{"heading": "H", "columns": ["a"], "rows": [[1, 2]]}], "every row needs 1 cells"),
    ([{"heading": "H", "columns": [], "rows": [], "plots": [{"title": "t"}]}], "a plot needs"),
])
def test_malformed_sections_are_refused(sections, words):
    with pytest.raises(ValueError, match=words):
        render_report("T", sections)


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    pytest.skip("no chromium on PATH: install Debian's chromium (apt-get install -y chromium) for the render test")


@pytest.mark.slow
def test_chromium_renders_the_report_under_its_csp(page, tmp_path):
    chromium = _chromium()
    html = tmp_path / "report.html"
    html.write_bytes(page)
    common = [chromium, "--headless=new", "--disable-gpu", "--no-sandbox", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--hide-scrollbars",
              f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0",
              "--window-size=1280,2000"]
    dom = subprocess.run([*common, "--dump-dom", html.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert "Inter-rater agreement" in dom.stdout and dom.stdout.count("<svg") == 2
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "evaluation_report.png"
    taken = subprocess.run([*common, f"--screenshot={shot}", html.as_uri()], capture_output=True, text=True,
                           timeout=120)
    assert taken.returncode == 0 and shot.stat().st_size > 20_000, taken.stderr[-2000:]
    for output in (dom.stderr, taken.stderr):
        assert "Content Security Policy" not in output and "Refused to" not in output
    from PIL import Image

    with Image.open(shot) as image:
        assert image.size == (1280, 2000) and len(image.convert("L").getcolors(maxcolors=1 << 16) or [0, 0]) > 2
