"""`medtee eval`: the evaluation command group. `medtee eval ratings` summarises the clinician study's ratings.

Further verbs register on the group's subparsers object that :func:`add_parser` returns. Nothing heavy is imported
here: each handler imports what it needs.
"""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> argparse._SubParsersAction:
    """Register the `eval` group and its `ratings` verb; returns the group's subparsers for further verbs."""
    group = subparsers.add_parser("eval", help="evaluate a tuned model against its base (clinician ratings)")
    verbs = group.add_subparsers(dest="eval_command", metavar="VERB", required=True)
    ratings = verbs.add_parser(
        "ratings", help="summarise the blinded clinician study's ratings",
        description="Hashes the ratings file, then opens the sealed blinding, then prints the aggregates (numbers "
                    "only) and, with --out, writes a self-contained HTML report. Format: docs/evaluation.md. "
                    "Exit 2 on unusable input.")
    ratings.add_argument("ratings", metavar="RATINGS.csv", help="the study's ratings (CSV, see docs/evaluation.md)")
    ratings.add_argument("--blinding", required=True, metavar="BLINDING.sealed",
                         help="the sealed blinding (which of A/B is the tuned model's answer, per item)")
    ratings.add_argument("--key", required=True, metavar="STUDY_OWNER.key",
                         help="the study owner's private key (from `medtee keys new`) the blinding is sealed to")
    ratings.add_argument("--out", metavar="REPORT.html", help="write the HTML report here (atomically)")
    ratings.add_argument("--json", action="store_true", help="print the aggregates as JSON")
    ratings.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    ratings.add_argument("--min-items", type=int, default=20,
                         help="refuse fewer rated items than this (default 20, as tracking.min_aggregate)")
    ratings.set_defaults(handler=run_ratings)
    packet = verbs.add_parser(
        "packet", help="the study owner's side: open a rating packet of `medtee generate` for the raters",
        description="Decrypts rating_packet.sealed with the study owner's key and writes items.json (context and "
                    "answers A/B per item, for the raters) and ratings_template.csv (to fill in). The packet holds "
                    "patient text: open it only where the study's protocol allows.")
    packet.add_argument("packet", metavar="rating_packet.sealed")
    packet.add_argument("--key", required=True, metavar="STUDY_OWNER.key", help="the study owner's private key")
    packet.add_argument("--out", required=True, metavar="DIR", help="directory for items.json and the ratings sheet")
    packet.set_defaults(handler=run_packet)
    return verbs


def run_packet(args: argparse.Namespace) -> int:
    """Handler of `medtee eval packet`: open the packet, write the raters' files; counts only on the terminal."""
    from pathlib import Path

    from medtee import exits
    from medtee.evaluation.packet import open_packet, write_for_raters

    try:
        items = open_packet(args.packet, args.key)
        items_path, sheet_path = write_for_raters(items, Path(args.out))
    except FileNotFoundError as exc:
        return exits.fail(f"eval packet: {exc.filename or args.packet}: no such file")
    except (ValueError, OSError) as exc:  # a wrong key is a KeyWrapError (ValueError)
        return exits.fail(f"eval packet: {args.packet}: {getattr(exc, 'strerror', None) or exc}")
    print(f"{len(items)} items for the raters in {items_path}; their ratings go in {sheet_path}")
    return exits.OK


def _print_text(summary: dict) -> None:
    from medtee.evaluation.ratings import MODELS, SCORES
    from medtee.evaluation.report import interval

    print(f"ratings sha256 {summary['ratings_sha256']}")
    print(f"raters {summary['n_raters']}  items {summary['n_items']}  ratings {summary['n_ratings']}")
    for score in SCORES:
        cells = [f"{m} {interval(*(summary['models'][m][score][k] for k in ('mean', 'ci_low', 'ci_high')))}"
                 for m in MODELS]
        print(f"{score:<20} {'  '.join(cells)}")
    d = summary["recommendation_delta"]
    print(f"recommendation tuned-base {interval(d['delta'], d['ci_low'], d['ci_high'])}  items {d['n']}")
    p = summary["preference"]
    print(f"prefer tuned {interval(p['share'], p['ci_low'], p['ci_high'])}  decided {p['n']}  ties {p['ties']}")
    for level, a in summary["agreement"].items():
        shown = interval(a["alpha"], a["ci_low"], a["ci_high"]) if a else "undefined (too few raters per answer)"
        print(f"alpha {level:<9} {shown}")


def run_ratings(args: argparse.Namespace) -> int:
    """Handler of `medtee eval ratings`: hash the ratings, open the blinding, summarise, print, write the report."""
    import json

    from medtee import exits
    from medtee.evaluation.ratings import RatingsFile, open_blinding, report_sections, summarize
    from medtee.evaluation.report import external_references, render_report
    from medtee.files import write_atomic

    if args.seed < 0:
        return exits.fail(f"eval ratings: --seed {args.seed}: give a seed of 0 or more")
    step, path = "ratings", args.ratings
    try:
        ratings = RatingsFile.load(args.ratings)  # hashed before the blinding is opened
        step, path = "blinding", args.blinding
        blinding = open_blinding(args.blinding, args.key)
        step, path = "ratings", args.ratings
        summary = summarize(ratings, blinding, seed=args.seed, min_items=args.min_items)
    except FileNotFoundError as exc:
        return exits.fail(f"eval ratings: {exc.filename}: no such file" if exc.filename else f"eval ratings: {exc}")
    except (ValueError, OSError) as exc:  # KeyWrapError and NotRegularFile are ValueErrors
        return exits.fail(f"eval ratings: {step} {path}: {getattr(exc, 'strerror', None) or exc}")
    if args.out:  # written before anything is printed, so a failure leaves one line and no half output
        page = render_report("Clinician study: tuned vs base", report_sections(summary))
        if found := external_references(page):
            return exits.fail(f"eval ratings: the report would reference {len(found)} external resource(s); "
                              "not written", exits.FAILED)
        try:
            write_atomic(args.out, page)
        except OSError as exc:
            return exits.fail(f"eval ratings: --out {args.out}: cannot write the report ({exc.strerror})")
    if args.json:
        print(json.dumps(summary, indent=1, sort_keys=True))
    else:
        _print_text(summary)
    if args.out:
        print(f"report written to {args.out}")
    return exits.OK
