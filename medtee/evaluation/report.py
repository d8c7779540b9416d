"""One self-contained HTML report of aggregates: tables and inline SVG plots (matplotlib), no script, no external
font, stylesheet, image or link, a Content-Security-Policy of `default-src 'none'`, and byte-identical output for
identical input. Two checks a caller runs before writing one: :func:`external_references` (must be empty) and
:func:`shared_ngrams` against the evaluation's texts (must be empty).

A section is a dict::

    {"heading": str,                      # required
     "note": str,                         # optional sentence under the heading
     "columns": [str, ...],               # required: the table's header
     "rows": [[cell, ...], ...],          # required: cells are str, int, float (3 decimals) or None ("n/a")
     "plots": [plot, ...]}                # optional

and a plot is ``{"title": str, "labels": [str], "values": [float], "low": [float|None], "high": [float|None],
"xlabel": str, "reference": float}`` (``reference`` optional: a dashed vertical line, e.g. 0 for a difference):
each label's estimate as a dot with its interval as a whisker.
"""

from __future__ import annotations

import html
import io
import re
from html.parser import HTMLParser
from typing import Iterable

CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; base-uri 'none'; form-action 'none'"
_SECTION_KEYS = {"heading", "note", "columns", "rows", "plots"}
_PLOT_KEYS = {"title", "labels", "values", "low", "high", "xlabel", "reference"}
_STYLE = """
body{font-family:system-ui,sans-serif;margin:2rem auto;max-width:60rem;color:#1a1a1a;line-height:1.4}
h1{font-size:1.6rem}h2{font-size:1.2rem;margin-top:2rem;border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:.5rem 0}th,td{border:1px solid #bbb;padding:.25rem .6rem;text-align:left}
th{background:#f0f0f0}td.n{text-align:right;font-variant-numeric:tabular-nums}
figure{margin:1rem 0}p.privacy{color:#555;font-size:.9rem}
"""
_SVG_RC = {"svg.hashsalt": "medtee-evaluation-report", "svg.fonttype": "none", "font.family": "sans-serif"}
_SVG_METADATA = {"Date": None, "Creator": None, "Format": None, "Type": None}


def interval(value: float | None, low: float | None, high: float | None) -> str:
    """`value [low, high]` with 3 decimals (a report cell); "n/a" for a missing number."""
    return f"{_number(value)} [{_number(low)}, {_number(high)}]"


def _number(x) -> str:
    return "n/a" if x is None else f"{x:.3f}" if isinstance(x, float) else str(x)


def _cell(x, tag: str = "td") -> str:
    numeric = isinstance(x, (int, float)) and not isinstance(x, bool)
    return f"<{tag}{' class=n' if numeric else ''}>{html.escape(_number(x))}</{tag}>"


def _check_section(number: int, section: dict) -> None:
    if not isinstance(section, dict) or not {"heading", "columns", "rows"} <= set(section) <= _SECTION_KEYS:
        raise ValueError(f"section {number} must be a dict with heading, columns, rows (and optional note, plots)")
    width = len(section["columns"])
    if any(len(row) != width for row in section["rows"]):
        raise ValueError(f"section {number}: every row needs {width} cells, one per column")
    for plot in section.get("plots", ()):
        if not {"title", "labels", "values", "low", "high", "xlabel"} <= set(plot) <= _PLOT_KEYS:
            raise ValueError(f"section {number}: a plot needs title, labels, values, low, high, xlabel")
        if not len(plot["labels"]) == len(plot["values"]) == len(plot["low"]) == len(plot["high"]):
            raise ValueError(f"section {number}: a plot's labels, values, low and high differ in length")


def _svg(plot: dict, prefix: str) -> str:
    """The plot as inline SVG: no XML prolog, DTD or namespace URIs (HTML implies them), ids prefixed to stay
    unique in the page."""
    import matplotlib
    from matplotlib.figure import Figure

    labels = list(plot["labels"])
    with matplotlib.rc_context(_SVG_RC):
        fig = Figure(figsize=(7, 0.45 * len(labels) + 1.2))
        ax = fig.add_subplot()
        ys = range(len(labels))[::-1]
        for y, value, low, high in zip(ys, plot["values"], plot["low"], plot["high"]):
            error = None if low is None or high is None else [[value - low], [high - value]]
            ax.errorbar([value], [y], xerr=error, fmt="o", color="#1f4e79", capsize=4)
        if plot.get("reference") is not None:
            ax.axvline(plot["reference"], color="#888", linestyle="--", linewidth=1)
        ax.set_yticks(list(ys), labels)
        ax.set_ylim(-0.7, len(labels) - 0.3)
        ax.set_xlabel(plot["xlabel"])
        ax.set_title(plot["title"])
        ax.grid(axis="x", color="#ddd")
        fig.tight_layout()
        buffer = io.StringIO()
        fig.savefig(buffer, format="svg", metadata=_SVG_METADATA)
    svg = buffer.getvalue()
    svg = svg[svg.index("<svg"):]
    svg = re.sub(r'\s+xmlns(?::xlink)?="[^"]*"', "", svg)  # namespace URIs: implied by HTML, no fetch but no URL
    svg = re.sub(r'\bid="', f'id="{prefix}', svg)
    return re.sub(r'(href="#|url\(#)', rf"\g<1>{prefix}", svg)


def _section(number: int, section: dict) -> str:
    parts = [f"<section><h2>{html.escape(section['heading'])}</h2>"]
    if section.get("note"):
        parts.append(f"<p>{html.escape(section['note'])}</p>")
    parts.append("<table><thead><tr>" + "".join(_cell(c, "th") for c in section["columns"]) + "</tr></thead><tbody>")
    parts += ["<tr>" + "".join(_cell(c) for c in row) + "</tr>" for row in section["rows"]]
    parts.append("</tbody></table>")
    for index, plot in enumerate(section.get("plots", ())):
        parts.append(f"<figure>{_svg(plot, f's{number}p{index}-')}</figure>")
    parts.append("</section>")
    return "\n".join(parts)


def render_report(title: str, sections: list[dict]) -> bytes:
    """The report as UTF-8 HTML bytes (format of `sections`: this module's docstring)."""
    for number, section in enumerate(sections, 1):
        _check_section(number, section)
    body = "\n".join(_section(n, s) for n, s in enumerate(sections, 1))
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">\n'
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">\n'
            f'<meta name="referrer" content="no-referrer">\n'
            f"<title>{html.escape(title)}</title>\n<style>{_STYLE}</style></head>\n<body>\n"
            f"<h1>{html.escape(title)}</h1>\n"
            f'<p class="privacy">Aggregates only: this report holds no prompt, reply, reference or comment text.</p>\n'
            f"{body}\n</body></html>\n")
    return page.encode("utf-8")


_FORBIDDEN_TAGS = {"script", "link", "iframe", "frame", "frameset", "object", "embed", "applet", "base", "form",
                   "audio", "video", "source", "track", "portal"}
_URL_ATTRS = {"src", "href", "xlink:href", "srcset", "action", "formaction", "poster", "data", "background", "cite",
              "longdesc", "ping", "manifest", "codebase", "archive", "usemap", "lowsrc", "dynsrc"}
_CSS_URL = re.compile(r"url\(\s*['\"]?\s*([^'\")\s]*)", re.IGNORECASE)


def _local(url: str) -> bool:
    url = url.strip()
    return url.startswith("#") or url.lower().startswith("data:")


def _css_problems(css: str, where: str) -> list[str]:
    found = [f"{where}: url({u})" for u in _CSS_URL.findall(css) if not _local(u)]
    return found + ([f"{where}: @import"] if "@import" in css.lower() else [])


class _Scanner(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.found: list[str] = []
        self.text: list[str] = []
        self._hidden = 0  # inside <style> or <script>

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _FORBIDDEN_TAGS:
            self.found.append(f"<{tag}>")
        if tag in ("style", "script"):
            self._hidden += 1
        for name, value in attrs:
            value = value or ""
            if name in _URL_ATTRS and value and not _local(value):
                self.found.append(f"<{tag} {name}={value}>")
            if name == "http-equiv" and value.lower() == "refresh":
                self.found.append(f"<{tag} http-equiv=refresh>")
            self.found += _css_problems(value, f"<{tag} {name}>")
            if name in ("alt", "title", "aria-label", "placeholder", "value"):
                self.text.append(value)

    def handle_endtag(self, tag: str) -> None:
        if tag in ("style", "script") and self._hidden:
            self._hidden -= 1

    def handle_data(self, data: str) -> None:
        if self._hidden:
            self.found += _css_problems(data, "<style>")
        else:
            self.text.append(data)


def _scan(html_text: str) -> _Scanner:
    scanner = _Scanner()
    scanner.feed(html_text)
    scanner.close()
    return scanner


def external_references(html_bytes: bytes) -> list[str]:
    """What in the page could make a browser fetch or run something: script, link, iframe and similar elements, any
    src/href-like attribute or CSS url() that is not a #fragment or a data: URI, @import, a meta refresh."""
    return _scan(html_bytes.decode("utf-8", errors="replace")).found


def _ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    words = re.findall(r"\w+", text.lower())
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def shared_ngrams(html_text: str, texts: Iterable[str], n: int = 8) -> list[str]:
    """The word n-grams (case-insensitive `\\w+` words) of `texts` that occur in the page's visible text (text
    nodes, SVG text included, and alt/title-like attributes). The result quotes those texts: count it, never print
    or log it."""
    if n < 1:
        raise ValueError(f"n={n}: an n-gram needs at least one word")
    page = _ngrams(" ".join(_scan(html_text).text), n)
    shared = set().union(*(_ngrams(t, n) & page for t in texts)) if page else set()
    return sorted(" ".join(gram) for gram in shared)
