"""Recipes are data: what a recipe file, a command-line override or a `medtee train` flag may say.

Hydra can import and call code named in configuration (`hydra.callbacks`, launchers, sweepers, `_target_`),
read the environment and files through interpolation resolvers (`${oc.env:...}`), load config files from any search
path, and unpickle a config (`--experimental-rerun`). medtee allows none of it from anything a user supplies:

- a recipe may contain only the schema's sections and a `defaults` list of `override /GROUP: OPTION` entries naming
  a shipped option (and `_self_`); no `hydra` section, no `_target_`-style key, no resolver interpolation;
- an override may only choose a shipped option of a medtee group or set a recipe field; no `hydra.*`, no `+`, `++`
  or `~`, no `@package`;
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


def check_overrides(overrides: list[str], *, groups: dict[str, list[str] | None], fields: list[str],
                    multirun: bool = True) -> None:
    """Each override, given once and holding no resolver, chooses a shipped option of a group in `groups` (group ->
    options, or None to leave them unchecked) or sets a field whose top level is in `fields`; sweeps only with
    `multirun`."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import OverrideType

    parsed = OverridesParser.create().parse_overrides(overrides)
    seen: set[str] = set()
    for o in parsed:
        key = o.key_or_group
        if key in seen:
            raise RecipeRuleError(f"'{o.input_line}': {key} is given twice; give each key once")
        seen.add(key)
        check_values({key: o.input_line}, "the command line")  # the text itself: Hydra keeps and may resolve it
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
            values = list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.value()]
            for value in values:
                if not isinstance(value, str) or value not in groups[key]:
                    raise RecipeRuleError(f"'{o.input_line}': {key} must name one of its options: "
                                          f"{', '.join(groups[key])}")
        elif key.split(".")[0] not in fields:
            raise RecipeRuleError(f"'{o.input_line}': unknown key '{key}'. Valid top-level keys: "
                                  f"{', '.join(fields)}; valid groups: {', '.join(groups)}")


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


def check_recipe_node(node: Any, source: str, *, groups: dict[str, list[str]], fields: list[str]) -> None:
    """A recipe file's content (as loaded, unresolved): schema sections, a defaults list of shipped options, data."""
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
    check_values({k: v for k, v in node.items() if k != "defaults"}, source)


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


def check_values(node: Any, source: str) -> None:
    """No special key and no resolver interpolation anywhere in `node` (a plain container, unresolved)."""
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
