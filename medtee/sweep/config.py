"""Schema of the `sweep` config group: the search space, the objective, the sampler and the study's storage.

`SweepConfig.problems(section)` works on a dataclass instance and on a composed config group alike;
`check_parameters(space, cfg)` checks the search space against a composed recipe. A trial's values become recipe
overrides (`to_overrides`), which the caller composes: every value passes the recipe guard and the schemas like any
other override. Imports nothing heavy.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from enum import Enum
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Dict, List, Optional
from urllib.parse import parse_qsl, urlsplit

from medtee.containment import OPERATOR_STORAGE, is_local_host, same_storage, storage_hosts
from medtee.schema import ConfigError, below_minimums
from medtee.tracking.config import METRIC_ALLOW_LIST

#: A study name, worker id, exception type or categorical choice: a short identifier, never free text.
IDENTIFIER = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_./-]{0,63}")

#: Config groups a sweep may vary. The others (hardware, attestation, encryption, broker, tracking, output) are the
#: sweep process's posture: one attestation and one key release serve every trial, so they stay fixed.
SWEEPABLE_GROUPS = ("qlora", "model", "data", "trainer")

#: Fields of those groups that choose what is trained on or from (or open the network), not how, and those that set
#: what the metrics cover (trials logging windows or validation passes of other sizes could be differenced down to a
#: few dialogues): fixed per sweep.
NOT_SWEEPABLE = ("data.source", "data.path", "data.val_fraction", "model.source", "model.id", "model.revision",
                 "model.offline", "trainer.resume_from", "trainer.validate_only", "trainer.log_every_n_steps",
                 "trainer.limit_val_batches", "trainer.val_check_interval")

#: Study storage URL schemes: a sqlite file or a PostgreSQL server (psycopg 3; `postgresql://` means psycopg too).
STORAGE_SCHEMES = ("sqlite", "postgresql", "postgresql+psycopg")

#: Query options a PostgreSQL storage URL may carry (libpq connection settings). Any other could load code, e.g.
#: SQLAlchemy's `plugin=`, or change what the server runs, e.g. libpq's `options=`.
STORAGE_QUERY_OPTIONS = ("host", "port", "sslmode", "sslrootcert", "connect_timeout")

#: libpq's environment variables that hold credentials, point to files holding them, or choose a service whose
#: entry may hold them: libpq would use them with whatever server a storage URL names.
PG_CREDENTIAL_ENV = ("PGPASSWORD", "PGPASSFILE", "PGSERVICE", "PGSERVICEFILE", "PGSSLCERT", "PGSSLKEY")

#: Files in the home directory libpq reads credentials from when no variable names another.
PG_CREDENTIAL_FILES = (".pgpass", ".postgresql/postgresql.key")

#: `sslmode` values that let libpq talk to a server in the clear (a man in the middle can force it); production
#: profiles need `verify-full` for a server that is not on this machine (`containment.storage_egress_problems`).
WEAK_SSLMODES = ("disable", "allow", "prefer")


class ParamType(str, Enum):
    float = "float"  # a real number in [low, high], optionally log-scaled or on a step grid
    int = "int"  # an integer in [low, high], step 1 unless `step`
    categorical = "categorical"  # one of `choices`


class Direction(str, Enum):
    minimize = "minimize"
    maximize = "maximize"


class Sampler(str, Enum):
    tpe = "tpe"  # Optuna's tree-structured Parzen estimator (the default)
    gp = "gp"  # Gaussian-process Bayesian optimisation (torch, scipy)
    grid = "grid"  # every combination of discrete values (categorical, int, or float with a step)
    random = "random"  # independent uniform draws


@dataclass
class Distribution:
    type: ParamType = ParamType.float  # float | int | categorical
    low: Optional[float] = None  # smallest value (float, int)
    high: Optional[float] = None  # largest value, inclusive (float, int)
    log: bool = False  # sample on a log scale (float, int; low > 0; no step)
    step: Optional[float] = None  # spacing of the values from low (float, int); grid needs it for float
    choices: Optional[List[Any]] = None  # the values (categorical): numbers, booleans or short identifiers


@dataclass
class SweepConfig:
    name: str = "sweep"  # Optuna study name (an identifier); the same name resumes the same study
    # recipe field (dotted, e.g. trainer.lr) -> its distribution; the trial's values become recipe overrides
    parameters: Dict[str, Distribution] = field(default_factory=dict)
    objective: str = "val/loss"  # the metric the sweep optimises, from medtee's metric allow-list
    direction: Direction = Direction.minimize  # minimize | maximize the objective
    sampler: Sampler = Sampler.tpe  # tpe | gp | grid | random
    n_trials: int = 10  # COMPLETE trials wanted in total (a resumed sweep runs only the missing ones)
    max_attempts: Optional[int] = None  # cap on finished trials, failed ones included; None: 2 * n_trials + 5
    seed: int = 0  # sampler seed (each worker derives its own from it and its worker name)
    # this worker's name (an identifier): its sampler is seeded from `seed` and it, so the same name and seed on a new
    # study sample the same points; None: HOST-PID, so every invocation explores new ones. Concurrent workers need
    # different names (with one name they would propose the same points)
    worker: Optional[str] = None
    # Optuna storage: None keeps a sqlite file beside the MLflow store (sqlite:///optuna.db); or sqlite:///FILE, or
    # postgresql+psycopg://USER@HOST/DB (password in PGPASSWORD or ~/.pgpass, never in the URL)
    storage: Optional[str] = None
    timeout_s: Optional[int] = None  # this worker starts no trial after this many seconds; None: no limit
    heartbeat_s: int = 60  # a running trial's heartbeat interval (and how often an idle worker looks for work)
    grace_s: Optional[int] = None  # a trial without heartbeat this long is stale: failed and re-run; None: 2x

    def problems(self) -> list[str]:
        out = below_minimums(self, "sweep", {"n_trials": 1, "heartbeat_s": 1, "timeout_s": 1})
        if not IDENTIFIER.fullmatch(str(self.name)):
            out.append(f"sweep.name={self.name!r}: name the study with letters, digits, '_', '.', '/' or '-' "
                       f"(at most 64 characters)")
        if self.worker is not None and not IDENTIFIER.fullmatch(str(self.worker)):
            out.append(f"sweep.worker={self.worker!r}: name the worker with letters, digits, '_', '.', '/' or '-' "
                       f"(at most 64 characters)")
        if self.objective not in METRIC_ALLOW_LIST:
            out.append(f"sweep.objective={self.objective!r} is not an allow-listed metric; use one of "
                       f"{', '.join(METRIC_ALLOW_LIST)}")
        if self.max_attempts is not None and self.max_attempts < self.n_trials:
            out.append(f"sweep.max_attempts={self.max_attempts} must be at least sweep.n_trials={self.n_trials}")
        if self.grace_s is not None and self.grace_s <= self.heartbeat_s:
            out.append(f"sweep.grace_s={self.grace_s} must exceed sweep.heartbeat_s={self.heartbeat_s}, or a live "
                       f"trial would be taken for a dead one")
        if not self.parameters:
            out.append("sweep.parameters is empty: map at least one recipe field to a distribution, e.g. "
                       "trainer.lr: {type: float, low: 1e-5, high: 1e-3, log: true}")
        for key, dist in self.parameters.items():
            out += key_problems(key) + distribution_problems(key, dist)
        if self.sampler == Sampler.grid and not out:
            out += _grid_problems(self)
        if self.storage is not None:
            out += storage_problems(self.storage)
        return out

    def attempt_cap(self) -> int:
        """How many trials may finish (COMPLETE or FAIL) before the sweep stops trying: a cap on failures."""
        return self.max_attempts if self.max_attempts is not None else 2 * self.n_trials + 5

    def grace(self) -> int:
        return self.grace_s if self.grace_s is not None else 2 * self.heartbeat_s


def key_problems(key: str) -> list[str]:
    """Why `key` cannot be swept (it must name a field of a sweepable group), or nothing."""
    group = key.partition(".")[0]
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+", key):
        return [f"sweep.parameters: {key!r} is not a dotted recipe field such as trainer.lr"]
    if group not in SWEEPABLE_GROUPS:
        return [f"sweep.parameters: {key} cannot be swept; one attestation and key release serve every trial, so "
                f"only fields of {', '.join(SWEEPABLE_GROUPS)} may vary"]
    if key in NOT_SWEEPABLE:
        return [f"sweep.parameters: {key} chooses what is trained, or what the metrics cover, not how: set it once "
                f"for the whole sweep (trials whose windows differ could be differenced down to a few dialogues)"]
    return []


def distribution_problems(key: str, d: Distribution) -> list[str]:
    """What is wrong with one parameter's distribution: its range, step, scale or choices."""
    where = f"sweep.parameters.{key}"
    if d.type == ParamType.categorical:
        if any(v is not None for v in (d.low, d.high, d.step)) or d.log:
            return [f"{where}: a categorical parameter takes only `choices`, not low/high/step/log"]
        if not d.choices:
            return [f"{where}: list its `choices`"]
        bad = [c for c in d.choices if not _plain_choice(c)]
        if bad:
            return [f"{where}: choices must be numbers, booleans or identifiers (letters, digits, '_', '.', '/', "
                    f"'-'); not: {', '.join(map(repr, bad))}"]
        if len({repr(c) for c in d.choices}) != len(d.choices):
            return [f"{where}: choices repeat a value"]
        return []
    if d.choices is not None:
        return [f"{where}: `choices` is for type: categorical; type: {d.type.value} takes low and high"]
    if d.low is None or d.high is None:
        return [f"{where}: type: {d.type.value} needs low and high"]
    out = []
    if not d.low < d.high:
        out.append(f"{where}: low={d.low} must be below high={d.high}")
    if d.log and d.low <= 0:
        out.append(f"{where}: log scale needs low > 0 (got {d.low})")
    if d.log and d.step is not None:
        out.append(f"{where}: choose log or step, not both")
    if d.step is not None and not d.step > 0:
        out.append(f"{where}: step={d.step} must be positive")
    if d.type == ParamType.int and any(v is not None and v != int(v) for v in (d.low, d.high, d.step)):
        out.append(f"{where}: an int parameter needs whole-number low, high and step")
    return out


def _plain_choice(value: Any) -> bool:
    if isinstance(value, bool) or (isinstance(value, (int, float)) and math.isfinite(value)):
        return True
    return isinstance(value, str) and IDENTIFIER.fullmatch(value) is not None


def grid_values(d: Distribution) -> list[Any] | None:
    """Every value a grid sampler visits for one parameter, or None when it is continuous (float without step)."""
    if d.type == ParamType.categorical:
        return list(d.choices or [])
    if d.type == ParamType.int:
        return list(range(int(d.low), int(d.high) + 1, int(d.step or 1)))
    if d.step is None:
        return None
    count = int(math.floor((d.high - d.low) / d.step + 1e-9)) + 1
    return [round(d.low + i * d.step, 12) for i in range(count)]


def in_space(d: Distribution, value: Any) -> bool:
    """Whether `value` is one that `d` can give (Optuna uses a queued trial's stored values even out of range)."""
    if d.type == ParamType.categorical:
        return any(type(value) is type(c) and value == c for c in d.choices or [])
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not d.low <= value <= d.high:
        return False
    if d.type == ParamType.int and value != int(value):
        return False
    return d.step is None or abs((value - d.low) / d.step - round((value - d.low) / d.step)) < 1e-6


def _grid_problems(space: SweepConfig) -> list[str]:
    values = {key: grid_values(d) for key, d in space.parameters.items()}
    continuous = sorted(k for k, v in values.items() if v is None)
    if continuous:
        return [f"sweep.sampler=grid needs discrete values: give {', '.join(continuous)} a step or choices"]
    points = math.prod(len(v) for v in values.values())
    if points < space.n_trials:
        return [f"sweep.n_trials={space.n_trials} exceeds the grid's {points} points; a grid runs each point once: "
                f"set sweep.n_trials={points} or widen the grid"]
    return []


def storage_problems(url: str) -> list[str]:
    """Why `url` may not hold a study (scheme, password, query options), or nothing."""
    if "#" in url:  # urlsplit would call the rest a fragment; SQLAlchemy reads its query options from it
        return ["sweep.storage may not contain '#': write the URL without a fragment"]
    parts = urlsplit(url)
    if parts.scheme not in STORAGE_SCHEMES:
        return [f"sweep.storage={_display(url)!r}: studies live in sqlite:///FILE or "
                f"postgresql+psycopg://USER@HOST/DB (any other scheme selects other database drivers)"]
    out = []
    if parts.password:
        out.append("sweep.storage holds a password, which the recipe would carry into its digest and MLflow: put "
                   "it in PGPASSWORD or ~/.pgpass instead")
    if parts.scheme == "sqlite" and parts.query:
        out.append(f"sweep.storage={_display(url)!r}: a sqlite storage takes no query options")
    extra = sorted({k for k, _ in parse_qsl(parts.query, keep_blank_values=True)} - set(STORAGE_QUERY_OPTIONS))
    if parts.scheme != "sqlite" and extra:
        out.append(f"sweep.storage: query options {', '.join(extra)} are not allowed (some load code); allowed: "
                   f"{', '.join(STORAGE_QUERY_OPTIONS)}")
    keys = [k for k, _ in parse_qsl(parts.query, keep_blank_values=True)]
    repeated = sorted({k for k in keys if keys.count(k) > 1})
    if parts.scheme != "sqlite" and repeated:
        out.append(f"sweep.storage: query options {', '.join(repeated)} are given twice; give each once")
    remote = [h for h in storage_hosts(url) if not is_local_host(h)]
    mode = dict(parse_qsl(parts.query)).get("sslmode")
    if parts.scheme != "sqlite" and remote and mode in WEAK_SSLMODES:
        out.append(f"sweep.storage: sslmode={mode} lets libpq talk to {', '.join(remote)} in the clear (a password "
                   f"included): use sslmode=verify-full (or at least require)")
    return out


def _postgres(url: str | None) -> bool:
    return bool(url) and urlsplit(url).scheme in STORAGE_SCHEMES and urlsplit(url).scheme != "sqlite"


def storage_credential_sources(environ: Mapping[str, str] | None = None) -> list[str]:
    """The operator's PostgreSQL credentials libpq would use with any server a storage URL names: the variables of
    PG_CREDENTIAL_ENV that are set, and the files of PG_CREDENTIAL_FILES in the home directory ($HOME, or the
    account's own: libpq versions differ in which they read)."""
    environ = os.environ if environ is None else environ
    found = [name for name in PG_CREDENTIAL_ENV if environ.get(name)]
    homes = _homes(environ)
    for name in PG_CREDENTIAL_FILES:
        if any(os.path.lexists(Path(home) / name) for home in homes):
            found.append(f"~/{name}")
    return found


def _homes(environ: Mapping[str, str]) -> list[str]:
    """The home directories libpq may read: $HOME and the account's (from the password database)."""
    homes = [environ.get("HOME") or ""]
    try:
        import pwd

        homes.append(pwd.getpwuid(os.geteuid()).pw_dir)
    except (ImportError, KeyError, OSError):
        pass
    return [home for home in homes if home]


def storage_credentials_problem(url: str | None, environ: Mapping[str, str] | None = None) -> str | None:
    """Why the operator's PostgreSQL credentials would go to a study storage the operator did not name in
    MEDTEE_SWEEP_STORAGE (a recipe could name any server: libpq would send it PGPASSWORD or the ~/.pgpass entry),
    or None. A sqlite storage, or a PostgreSQL one without credentials around, needs no name."""
    environ = os.environ if environ is None else environ
    if not _postgres(url):
        return None
    sources = storage_credential_sources(environ)
    if not sources or same_storage(url, environ.get(OPERATOR_STORAGE, "")):
        return None
    return (f"sweep.storage names a PostgreSQL server other than {OPERATOR_STORAGE} while {', '.join(sources)} is "
            f"set: libpq would send those credentials to it. Set {OPERATOR_STORAGE} to the storage URL you trust "
            f"(the same text as sweep.storage), or unset the credentials")


def _display(url: str) -> str:
    parts = urlsplit(url)
    return url.replace(parts.netloc, parts.netloc.rpartition("@")[2], 1).split("?", 1)[0] if parts.netloc else url


def default_storage(tracking_uri: str | None) -> str:
    """The study storage when `sweep.storage` is None: optuna.db beside a sqlite MLflow store, else in the current
    directory."""
    if tracking_uri and tracking_uri.startswith("sqlite:///"):
        store = tracking_uri[len("sqlite:///"):]
        head, sep, _ = store.rpartition("/")
        return f"sqlite:///{head}{sep}optuna.db"
    return "sqlite:///optuna.db"


#: An interpolation in a recipe value: `${qlora.rank}`, `${.rank}` (what is inside the braces).
INTERPOLATION = re.compile(r"\$\{([^}]*)\}")


def _interpolations(node: Any, path: str = ""):
    """(dotted path, interpolated reference) of every `${...}` in the unresolved values of a nested mapping."""
    if isinstance(node, Mapping):
        for key, value in node.items():
            yield from _interpolations(value, f"{path}.{key}" if path else str(key))
    elif isinstance(node, Sequence) and not isinstance(node, str):
        for i, value in enumerate(node):
            yield from _interpolations(value, f"{path}[{i}]")
    elif isinstance(node, str):
        for ref in INTERPOLATION.findall(node):
            yield path, ref.strip()  # `${ qlora.rank }` is the same reference


def check_parameters(space: SweepConfig, cfg: Any) -> list[str]:
    """Problems of the search space against a composed recipe `cfg`: every key must name a leaf field of it, a
    numeric distribution a numeric field (an int distribution may drive a float field, not the reverse), and no
    setting may follow a swept one through an interpolation (the broker sees the recipe resolved once: a trial would
    change a setting the release policy's rules were checked on)."""
    from omegaconf import OmegaConf

    out = []
    raw = OmegaConf.to_container(cfg, resolve=False) if OmegaConf.is_config(cfg) else cfg
    for path, ref in _interpolations(raw):
        if ref.startswith(".") or any(ref == k or ref.startswith(f"{k}.") or k.startswith(f"{ref}.")
                                      for k in space.parameters):
            out.append(f"{path}: '${{{ref}}}' may follow a swept setting, which would change it per trial unseen by "
                       f"the key release; write its value out in a sweep's recipe")
    for key, d in space.parameters.items():
        node = _lookup(cfg, key)
        if node is _MISSING or isinstance(node, Mapping):
            out.append(f"sweep.parameters: {key} is not a field of the recipe")
        elif isinstance(node, Sequence) and not isinstance(node, str):
            out.append(f"sweep.parameters: {key} is a list; a sweep sets single values only")
        elif d.type != ParamType.categorical and (isinstance(node, bool) or not isinstance(node, (int, float))):
            out.append(f"sweep.parameters: {key} is not numeric; sweep it with type: categorical")
        elif d.type == ParamType.float and isinstance(node, int):
            out.append(f"sweep.parameters: {key} is an integer field; sweep it with type: int")
    return out


_MISSING = object()


def _lookup(cfg: Any, dotted: str) -> Any:
    """The value at `dotted` in a nested mapping (an OmegaConf DictConfig is one), or _MISSING."""
    node = cfg
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return _MISSING
        node = node[part]
    return node


def format_value(value: Any) -> str:
    """One suggested value as Hydra override text."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, float) else str(value)


def to_overrides(params: Mapping[str, Any]) -> list[str]:
    """A trial's values as recipe overrides, `trainer.lr=0.0003`, sorted by key."""
    return [f"{key}={format_value(value)}" for key, value in sorted(params.items())]


def from_section(section: Any) -> SweepConfig:
    """A SweepConfig from a composed `sweep` group or a plain mapping, typed by the schema (raises ConfigError)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(SweepConfig), section))
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", "") or ""
        raise ConfigError(f"sweep{'.' + key if key else ''}: {str(exc).splitlines()[0]}") from None
