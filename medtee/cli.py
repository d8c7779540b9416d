"""The `medtee` command. Heavy libraries are imported only inside the subcommand that needs them.

Exit codes: 0 success; 1 refusal (e.g. attestation rejected); 2 bad configuration or input; 3 a run failed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from medtee import exits


_TRAIN_HELP = """\
usage: medtee train [recipe=NAME] [KEY=VALUE ...] [-m] [--cfg job]

Runs a recipe (default: the demo) through the whole chain: recipe -> environment check -> attestation -> key release
-> sealed loader -> QLoRA training -> guarded MLflow -> encrypted adapter. Arguments are Hydra overrides:
  medtee train                                   the demo (CPU, tiny model, SIMULATED attestation)
  medtee train recipe=demo data=sealed data.path=DIR   train on a dataset sealed by `medtee seal`
  medtee train -m qlora.rank=8,16                a sweep (Hydra multirun)
  medtee train --cfg job                         print the resolved recipe without running it
Recipes: `medtee recipes list`. Hydra's own help: `medtee train --hydra-help`.
"""



def _train(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(_TRAIN_HELP)
        return exits.OK
    from medtee import config

    try:
        flags, overrides = config.split_argv(argv)
        overrides = config.use_recipe_files(overrides)
        for variant in config.expand_sweeps(overrides):
            cfg = config.compose(variant)
            if "--cfg" not in flags and "-c" not in flags:
                config.check_runnable(cfg)
    except config.ConfigError as exc:
        return exits.fail(f"configuration error: {exc}")
    except Exception as exc:  # an override Hydra's parser cannot read
        return exits.fail(f"configuration error: {str(exc).splitlines()[0]}")

    import hydra

    from medtee import run
    from medtee.paths import conf_dir

    codes: list[int] = []

    def task(cfg) -> None:
        codes.append(run.main(cfg))

    app = hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="config")(task)
    saved = sys.argv
    sys.argv = ["medtee train", *flags, *overrides]  # only what was checked above reaches Hydra
    try:
        app()
    finally:
        sys.argv = saved
    return max(codes, default=exits.OK)


def _recipes(args: argparse.Namespace) -> int:
    from medtee import config

    if args.action == "list":
        for name in config.recipe_names():
            print(name)
        return exits.OK
    if args.action == "show":
        if not args.name:
            return exits.fail("`medtee recipes show` needs a recipe NAME; see `medtee recipes list`")
        try:
            print(config.recipe_file(args.name).read_text(), end="")
        except config.ConfigError as exc:
            return exits.fail(str(exc))
        return exits.OK
    names = [args.name] if args.name else config.recipe_names()
    failed = 0
    for name in names:
        try:
            config.recipe_file(name)
            cfg = config.compose([f"recipe={name}"])
            print(f"ok      {name}  digest {config.recipe_digest(cfg)[:16]}")
        except config.ConfigError as exc:
            failed += 1
            print(f"INVALID {name}: {exc}")
    return exits.BAD_INPUT if failed else exits.OK


def _synth(args: argparse.Namespace) -> int:
    from medtee.data.synthetic import generate_dialogues, write_jsonl

    if args.n < 1:
        return exits.fail(f"--n must be at least 1 (got {args.n})")
    write_jsonl(generate_dialogues(args.n, seed=args.seed), args.out)
    print(f"wrote {args.n} synthetic dialogues (no real people) to {args.out}")
    return exits.OK


def _adapter_open(args: argparse.Namespace) -> int:
    from medtee.crypto.hpke import KeyWrapError
    from medtee.training.output import open_adapter

    for path in (args.encrypted, args.key):
        if not Path(path).is_file():
            return exits.fail(f"{path}: no such file")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        return exits.fail(f"--out {out} is a file; name a directory (it is created if missing)")
    if any(p.exists() and not p.is_dir() for p in out.parents):
        return exits.fail(f"--out {out}: a parent of it is a file; name a directory")
    try:
        out = open_adapter(Path(args.encrypted), Path(args.key), out)
    except KeyWrapError as exc:
        return exits.fail(f"{args.encrypted}: cannot decrypt with {args.key}: {exc}")
    except OSError as exc:
        return exits.fail(f"--out {out}: cannot write the adapter there ({exc.strerror or type(exc).__name__})")
    print(f"decrypted adapter written to {out}")
    return exits.OK


def build_parser() -> argparse.ArgumentParser:
    from medtee import __version__
    from medtee.attestation.cli import add_parser as add_attest
    from medtee.broker.cli import add_parser as add_broker
    from medtee.receipt.cli import add_parser as add_receipt
    from medtee.image.cli import add_parser as add_image
    from medtee.sealing.cli import add_parsers as add_sealing

    parser = argparse.ArgumentParser(
        prog="medtee",
        description="Confidential QLoRA fine-tuning of medical language models: Hydra recipes, sealed data, "
        "attestation-gated key release, PHI-safe MLflow tracking.",
    )
    parser.add_argument("--version", action="version", version=f"medtee {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("train", help="run a recipe (default: the demo); arguments are Hydra overrides", add_help=False)

    rec = sub.add_parser("recipes", help="list, show or validate the shipped recipes")
    rec.add_argument("action", choices=["list", "show", "validate"])
    rec.add_argument("name", nargs="?", help="recipe name (validate: all when omitted)")
    rec.set_defaults(handler=_recipes)

    syn = sub.add_parser("synth", help="write deterministic synthetic doctor-patient dialogues (chat JSONL)")
    syn.add_argument("--n", type=int, default=200, help="number of dialogues (default 200)")
    syn.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    syn.add_argument("--out", required=True, help="output JSONL file")
    syn.set_defaults(handler=_synth)

    ada = sub.add_parser("adapter", help="the recipient's side: decrypt a trained adapter")
    ada_sub = ada.add_subparsers(dest="adapter_command", metavar="ACTION", required=True)
    opn = ada_sub.add_parser("open", help="decrypt adapter.safetensors.enc into a peft adapter directory")
    opn.add_argument("encrypted", help="adapter.safetensors.enc from a run's output directory")
    opn.add_argument("--key", required=True, help="the recipient's private key file (from `medtee keys new`)")
    opn.add_argument("--out", required=True, help="directory for adapter_model.safetensors + adapter_config.json")
    opn.set_defaults(handler=_adapter_open)

    add_sealing(sub)
    add_broker(sub)
    add_image(sub)
    add_attest(sub)
    add_receipt(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "train":
        return _train(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return exits.OK if not argv else exits.BAD_INPUT
    return int(args.handler(args) or exits.OK)


if __name__ == "__main__":
    sys.exit(main())
