"""Recipes are data: what a recipe file, a command-line override or a `medtee train` flag may say.

Hydra can import and call code named in configuration (`hydra.callbacks`, launchers, sweepers, `_target_`),
read the environment and files through interpolation resolvers (`${oc.env:...}`), load config files from any search
path, and unpickle a config (`--experimental-rerun`). medtee allows none of it from anything a user supplies:

- a recipe may contain only the schema's sections and a `defaults` list of `override /GROUP: OPTION` entries naming
  a shipped option (and `_self_`); no `hydra` section, no `_target_`-style key, no resolver interpolation, and no
  reference to a field the recipe digest leaves out (`unreferable`: it would copy e.g. the dataset's path into a
  recorded field without changing the digest);
- an override may only choose a shipped option of a medtee group or set a recipe field; no `hydra.*`, no `+`, `++`
  or `~`, no `@package`; a multirun expands to at most MAX_MULTIRUN_JOBS jobs;
- `medtee train` passes only `-m`, `--cfg`, `--package`, `--resolve` and `--hydra-help` on to Hydra;
- after composition the Hydra section must equal the one medtee ships (`check_hydra_settings`), whatever route a
  change took.

Each refusal is a ConfigError naming the key, raised before anything runs or is written.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

#: A config option or recipe name: no path separators, dots or interpolation.
NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]*")
#: A node interpolation `${a.b}` / `${..a}`: a reference to another recipe value, no resolver (no colon).
_NODE_REFERENCE = re.compile(r"\$\{\s*\.*[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_]+)*\s*\}")
_SURROGATE = re.compile("[\ud800-\udfff]")
#: Hydra's and OmegaConf's special keys (`_target_`, `_args_`, `_partial_`, `_recursive_`, `_convert_`, ...).
_SPECIAL_KEY = re.compile(r"_.*_")

#: `medtee train` flags passed on to Hydra, with whether each takes a value.
HYDRA_FLAGS = {"-m": False, "--multirun": False, "--cfg": True, "-c": True, "--package": True, "-p": True,
               "--resolve": False, "--hydra-help": False}
_CFG_CHOICES = ("job", "hydra", "all")


class RecipeRuleError(ValueError):
    """Something a user supplied would change what code runs; the message names the key and the rule."""


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """(Hydra flags, overrides) of a `medtee train` command line; any other flag is refused."""
    flags: list[str] = []
    overrides: list[str] = []
    args = iter(argv)
    for arg in args:
        if not arg.startswith("-"):
            overrides.append(arg)
            continue
        name, eq, value = arg.partition("=")
        if name not in HYDRA_FLAGS:
            allowed = ", ".join(f"{f} VALUE" if v else f for f, v in HYDRA_FLAGS.items())
            raise RecipeRuleError(f"medtee train does not take '{name}' (it would change where configuration or "
                                  f"code is loaded from); allowed flags: {allowed}")
        flags.append(name)
        if HYDRA_FLAGS[name]:
            value = value if eq else next(args, "")
            if name in ("--cfg", "-c") and value not in _CFG_CHOICES:
                raise RecipeRuleError(f"{name} takes one of {', '.join(_CFG_CHOICES)} (got {value!r})")
            if not value or value.startswith("-"):
                raise RecipeRuleError(f"{name} needs a value")
            if name in ("--package", "-p") and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.]*", value):
                raise RecipeRuleError(f"{name} takes a recipe section, e.g. {name} qlora (got {value!r})")
            flags.append(value)
    _check_flag_combination(flags, overrides)
    return flags, overrides


def _check_flag_combination(flags: list[str], overrides: list[str]) -> None:
    """Combinations Hydra would answer with a traceback, refused with the fix."""
    printing = "--cfg" in flags or "-c" in flags
    if printing and ("-m" in flags or "--multirun" in flags):
        raise RecipeRuleError("--cfg prints one recipe: drop -m (or print each sweep value's recipe on its own)")
    if ("--resolve" in flags or "--package" in flags or "-p" in flags) and not printing:
        raise RecipeRuleError("--resolve and --package go with --cfg job|hydra|all")
    if "--hydra-help" in flags and (overrides or len(flags) > 1):
        raise RecipeRuleError("--hydra-help takes no other argument")


#: Fields that name the option chosen in their group: they are labels the run records (tags, receipts), so only
#: choosing another option changes them (a development profile may not call itself h200_sev_snp).
OPTION_LABELS = ("hardware.name", "attestation.name", "model.name")


def _label_refusal(key: str, source: str) -> str:
    group = key.split(".")[0]
    return (f"{source}: {key} names the chosen {group} option and cannot be set; choose another option with "
            f"{group}=NAME")


#: Most jobs one `medtee train -m` may expand to (the product of its sweeps' sizes): each is a full run, and every
#: job is composed and checked before the first starts. Larger searches: `medtee sweep` (Optuna, resumable).
MAX_MULTIRUN_JOBS = 64


def sweep_size(override, limit: int = MAX_MULTIRUN_JOBS) -> int:
    """How many values a parsed sweep override enumerates, counted up to `limit + 1` only (`range(1,1e8)` is never
    listed; Hydra lists a shuffled range whole, so ranges are counted from the range itself)."""
    from itertools import islice

    from hydra.core.override_parser.types import RangeSweep

    value = override.value()
    values = value.range() if isinstance(value, RangeSweep) else override.sweep_string_iterator()
    return sum(1 for _ in islice(values, limit + 1))


def multirun_jobs(parsed: list, limit: int = MAX_MULTIRUN_JOBS) -> int:
    """The number of jobs Hydra's multirun runs for these parsed overrides (every combination of the sweeps'
    values); RecipeRuleError when it exceeds `limit`."""
    sizes = {o.key_or_group: sweep_size(o, limit) for o in parsed if o.is_sweep_override()}
    jobs = 1
    for size in sizes.values():
        jobs = min(jobs * size, limit + 1)
    if jobs > limit:
        counts = ", ".join(f"{key} {'more than ' + str(limit) if n > limit else n}" for key, n in sizes.items())
        raise RecipeRuleError(f"-m would run more than {limit} jobs, one per combination of the sweeps' values "
                              f"({counts}); sweep fewer values, or search with `medtee sweep` (Optuna)")
    return jobs


def check_overrides(overrides: list[str], *, groups: dict[str, list[str] | None], fields: list[str],
                    multirun: bool = True, unreferable: tuple[str, ...] = ()) -> None:
    """Each override, given once and holding no resolver nor a reference to an `unreferable` field, chooses a shipped
    option of a group in `groups` (group -> options, or None to leave them unchecked) or sets a field whose top level
    is in `fields`; sweeps only with `multirun`, and at most MAX_MULTIRUN_JOBS combinations of them."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import OverrideType

    parsed = OverridesParser.create().parse_overrides(overrides)
    seen: set[str] = set()
    for o in parsed:
        key = o.key_or_group
        if key in seen:
            raise RecipeRuleError(f"'{o.input_line}': {key} is given twice; give each key once")
        seen.add(key)
        # the text itself: Hydra keeps and may resolve it
        check_values({key: o.input_line}, "the command line", unreferable=unreferable)
        if o.is_sweep_override() and not multirun:
            raise RecipeRuleError(f"'{o.input_line}' is a sweep: add -m to run one job per value")
        if key.split(".")[0].split("/")[0] == "hydra":
            raise RecipeRuleError(f"'{o.input_line}': Hydra's own settings (hydra.*) cannot be changed from the "
                                  "command line; they decide which code runs")
        if o.type != OverrideType.CHANGE:
            sign = {OverrideType.ADD: "+", OverrideType.FORCE_ADD: "++", OverrideType.DEL: "~"}[o.type]
            raise RecipeRuleError(f"'{o.input_line}': '{sign}' overrides are not allowed; set an existing key with "
                                  f"KEY=VALUE (every key a recipe can have is in its schema)")
        if o.package is not None:
            raise RecipeRuleError(f"'{o.input_line}': '@package' overrides are not allowed")
        if key in OPTION_LABELS:
            raise RecipeRuleError(_label_refusal(key, f"'{o.input_line}'"))
        if key in groups:
            if groups[key] is None:  # the options are checked later (recipe files)
                continue
            if o.is_sweep_override():
                multirun_jobs([o])  # before listing its values (Hydra lists a shuffled range whole)
            values = o.sweep_string_iterator() if o.is_sweep_override() else [o.value()]
            for value in values:
                if not isinstance(value, str) or value not in groups[key]:
                    raise RecipeRuleError(f"'{o.input_line}': {key} must name one of its options: "
                                          f"{', '.join(groups[key])}")
        elif key.split(".")[0] not in fields:
            raise RecipeRuleError(f"'{o.input_line}': unknown key '{key}'. Valid top-level keys: "
                                  f"{', '.join(fields)}; valid groups: {', '.join(groups)}")
    multirun_jobs(parsed)


#: Largest recipe file read (a recipe is a page of settings).
MAX_RECIPE_BYTES = 256 * 1024


def read_recipe_text(path) -> str:
    """A recipe file's text: a regular file of at most MAX_RECIPE_BYTES, UTF-8, whose YAML has no anchors or aliases
    (which let a small file expand without bound: "billion laughs")."""
    import yaml

    from medtee.files import NotRegularFile, read_regular, yaml_alias_line

    try:
        data = read_regular(path, MAX_RECIPE_BYTES)
    except NotRegularFile as exc:
        raise RecipeRuleError(f"recipe file {path} {exc}") from None
    except OSError as exc:
        raise RecipeRuleError(f"recipe file {path}: cannot open it ({exc.strerror})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecipeRuleError(f"recipe file {path}: not UTF-8 text (byte {exc.start})") from None
    try:
        line = yaml_alias_line(text)
    except yaml.YAMLError as exc:
        raise RecipeRuleError(f"recipe file {path} is not valid YAML: {exc}") from None
    if line is not None:
        raise RecipeRuleError(f"recipe file {path}, line {line}: YAML anchors and aliases are not allowed in recipes "
                              "(write the values out)")
    return text


def check_recipe_node(node: Any, source: str, *, groups: dict[str, list[str]], fields: list[str],
                      unreferable: tuple[str, ...] = ()) -> None:
    """A recipe file's content (as loaded, unresolved): schema sections, a defaults list of shipped options, data
    that refers to no `unreferable` field."""
    if not isinstance(node, dict):
        raise RecipeRuleError(f"{source}: a recipe is a mapping of config sections")
    for key in node:
        if key == "hydra":
            raise RecipeRuleError(f"{source}: key 'hydra': a recipe may not change Hydra's settings (callbacks, "
                                  "launchers, sweepers and search paths decide which code runs); remove it")
        if key != "defaults" and key not in fields:
            raise RecipeRuleError(f"{source}: unknown top-level key '{key}'. Valid keys: defaults, "
                                  f"{', '.join(fields)}")
    _check_defaults(node.get("defaults", []), source, groups)
    for key in OPTION_LABELS:
        group, field = key.split(".")
        if isinstance(node.get(group), dict) and field in node[group]:
            raise RecipeRuleError(_label_refusal(key, source))
    check_values({k: v for k, v in node.items() if k != "defaults"}, source, unreferable=unreferable)


def _check_defaults(defaults: Any, source: str, groups: dict[str, list[str]]) -> None:
    form = "entries of the form `- override /GROUP: OPTION` (or `- _self_`)"
    if not isinstance(defaults, list):
        raise RecipeRuleError(f"{source}: 'defaults' must be a list of {form}")
    for entry in defaults:
        if entry == "_self_":
            continue
        if not (isinstance(entry, dict) and len(entry) == 1):
            raise RecipeRuleError(f"{source}: defaults entry {entry!r}: a recipe's defaults are {form}")
        (key, value), = entry.items()
        group = str(key).removeprefix("override ").strip().lstrip("/")
        if not str(key).startswith("override /") or group not in groups:
            raise RecipeRuleError(f"{source}: defaults entry '{key}': a recipe's defaults are {form}, "
                                  f"GROUP one of {', '.join(groups)}")
        if value not in groups[group]:
            raise RecipeRuleError(f"{source}: defaults entry '{key}: {value}': {group} must name one of its "
                                  f"shipped options: {', '.join(groups[group])}")


def check_values(node: Any, source: str, *, unreferable: tuple[str, ...] = ()) -> None:
    """No special key, no resolver interpolation and no reference to an `unreferable` field (dotted keys from the
    root; a reference to one of their sections counts too) anywhere in `node` (a plain container, unresolved, its
    keys rooted where the recipe's are)."""
    for path, key, value in _walk(node, ""):
        if key is not None and _SPECIAL_KEY.fullmatch(key):
            raise RecipeRuleError(f"{source}: key '{path}': '{key}' is a Hydra instantiation key; recipes are data "
                                  "and name no code")
        if isinstance(value, str) and _SURROGATE.search(value):
            raise RecipeRuleError(f"{source}: key '{path}': the value is not valid Unicode text (a lone surrogate)")
        if isinstance(value, str) and "${" in value:
            rest = _NODE_REFERENCE.sub("", value)
            references = [m.strip("${} .").split(".")[0] for m in _NODE_REFERENCE.findall(value)]
            if "${" in rest or "hydra" in references:
                raise RecipeRuleError(f"{source}: key '{path}': interpolation {value!r} calls a resolver or reads "
                                      "Hydra's state; only references to other recipe values (${section.key}) "
                                      "are allowed")
            for reference in _NODE_REFERENCE.findall(value):
                target = _referenced_key(path, reference.strip("${} "))
                hit = next((f for f in unreferable if target == f or f.startswith(f"{target}.")
                            or target.startswith(f"{f}.")), None)
                if hit:
                    named = hit if target == hit or target.startswith(f"{hit}.") else f"{target} (it holds {hit})"
                    raise RecipeRuleError(
                        f"{source}: key '{path}': interpolation {value!r} refers to {named}, which the recipe digest "
                        f"leaves out and no record may carry (a data or store path can name a patient or a study; "
                        f"the copy would be recorded under an unchanged digest): write the value itself")


def _referenced_key(path: str, reference: str) -> str:
    """The dotted key from the root that `reference` (the inside of `${...}`) names, read from the value at `path`
    (`a.b[0].c`) as OmegaConf resolves it: `.x` is a sibling, each further leading dot one level up."""
    dots = len(reference) - len(reference.lstrip("."))
    if not dots:
        return reference
    container = re.findall(r"[^.\[\]]+", path)[:-1]
    up = dots - 1
    base = container[:len(container) - up] if up <= len(container) else []
    return ".".join([*base, reference[dots:]])


def _walk(node: Any, path: str) -> Iterator[tuple[str, str | None, Any]]:
    if isinstance(node, dict):
        for key, value in node.items():
            key = str(key)
            child = f"{path}.{key}" if path else key
            yield child, key, value
            yield from _walk(value, child)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            child = f"{path}[{i}]"
            yield child, None, value
            yield from _walk(value, child)


def check_hydra_settings(hydra_node: dict, shipped: dict) -> None:
    """The composed Hydra section equals the one medtee ships, but for the fields that record the overrides."""
    def comparable(h: dict) -> dict:
        h = {k: v for k, v in h.items() if k not in ("overrides", "runtime")}
        h["job"] = {k: v for k, v in h.get("job", {}).items() if k != "override_dirname"}
        return h

    path = _first_difference(comparable(hydra_node), comparable(shipped), "hydra")
    if path:
        raise RecipeRuleError(f"key '{path}': Hydra's settings cannot be changed by a recipe or an override")


def _first_difference(a: Any, b: Any, path: str) -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b), key=str):
            if key not in a or key not in b:
                return f"{path}.{key}"
            found = _first_difference(a[key], b[key], f"{path}.{key}")
            if found:
                return found
        return None
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return next(filter(None, (_first_difference(x, y, f"{path}[{i}]") for i, (x, y) in enumerate(zip(a, b)))),
                    None)
    return None if a == b else path
