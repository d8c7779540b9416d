"""Containment: what a run does so that patient text cannot spill out of the process.

No core dumps, no network egress but the tracking server, the key broker and a sweep's declared study storage,
temporary files in memory, every log record scrubbed when it is created and every handler filtered, exceptions and
warnings reported without their messages, progress bars limited to allow-listed metrics. No heavy import at module
level.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import re
import resource
import shutil
import signal
import sys
import tempfile
import threading
import traceback
import urllib.request
import warnings
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import parse_qsl, unquote, urlsplit

log = logging.getLogger("medtee.containment")

#: Set before any heavy import: no hub access, no telemetry from the libraries medtee runs. MLflow ignores
#: DO_NOT_TRACK=1 (it only honours "true"), hence MLFLOW_DISABLE_TELEMETRY.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
               "HF_DATASETS_OFFLINE": "1", "DO_NOT_TRACK": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
               "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING": "false", "TOKENIZERS_PARALLELISM": "false"}

#: Filesystems whose files live in (in a TEE: encrypted) memory only.
MEMORY_FILESYSTEMS = frozenset({"tmpfs", "ramfs"})

#: Frames shown when a failure is reported (innermost last).
FRAMES = 6

#: Log arguments whose text is longer than this are withheld (decoded samples and data reprs are long).
MAX_ARG_CHARS = 256

_PROXY_VARS = ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY")
_PR_SET_DUMPABLE = 4


# ---------------------------------------------------------------------------------------------- failure reports


class SafeError(RuntimeError):
    """A failure whose message medtee wrote from names and settings only (never data), so it may be printed."""


def failure_report(exc: BaseException, frames: int = FRAMES) -> list[str]:
    """Where a failure happened, never what it said: exception types (with causes) and the innermost frames."""
    chain, seen = [], set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        chain.append(type(cause).__name__)
        cause = cause.__cause__ or cause.__context__
    lines = [f"{' <- '.join(chain)} (message withheld: it may quote patient data)"]
    for frame in traceback.extract_tb(exc.__traceback__)[-frames:]:
        lines.append(f"  at {frame.filename}:{frame.lineno} in {frame.name}")
    return lines


def _excepthook(exc_type, exc, tb) -> None:
    print("\n".join(["uncaught " + line if i == 0 else line for i, line in enumerate(failure_report(exc))]),
          file=sys.stderr, flush=True)


def _thread_excepthook(args) -> None:
    if args.exc_value is not None:
        _excepthook(args.exc_type, args.exc_value, args.exc_traceback)


def _unraisablehook(unraisable) -> None:
    if unraisable.exc_value is not None:
        _excepthook(unraisable.exc_type, unraisable.exc_value, unraisable.exc_traceback)


# ---------------------------------------------------------------------------------------------------- scrubbing


#: Where a message starts quoting a value: a quote, a new line, or a tensor/array repr.
_VALUE_START = re.compile(r"['\"\n]|\b(?:tensor|array|Tensor|ndarray)\(")


def scrub_text(text: str, limit: int = 200) -> str:
    """A message that may interpolate values (a warning): kept up to where it starts quoting a value or a repr
    (the way Python code formats values: '...', !r, tensor(...)), at most `limit` characters."""
    text = str(text).strip()
    match = _VALUE_START.search(text)
    head = text[:match.start()] if match else text
    cut = match is not None or len(head) > limit
    return head[:limit].rstrip() + (" ... (rest withheld: it may quote data)" if cut else "")


def scrub_value(value, depth: int = 0):
    """A log argument made safe to format: tensors, arrays, tables, bytes, exceptions and long text become a
    description of their type and size; containers are scrubbed element by element."""
    if value is None or isinstance(value, (bool, int, float, Path)):
        return value
    if isinstance(value, str):
        return value if len(value) <= MAX_ARG_CHARS else f"<text of {len(value)} chars withheld>"
    if isinstance(value, BaseException):
        return f"<{type(value).__name__}: message withheld>"
    if isinstance(value, (bytes, bytearray, memoryview)):
        return f"<{type(value).__name__} of {len(value)} bytes withheld>"
    shape = getattr(value, "shape", None)
    if shape is not None and not isinstance(shape, (str, bytes)) and not callable(shape):
        return f"<{type(value).__name__} shape={tuple(shape) if hasattr(shape, '__iter__') else shape} withheld>"
    if isinstance(value, Mapping):
        if depth > 2 or len(value) > 32:
            return f"<{type(value).__name__} of {len(value)} items withheld>"
        return {scrub_value(k, depth + 1): scrub_value(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        if depth > 2 or len(value) > 32:
            return f"<{type(value).__name__} of {len(value)} items withheld>"
        items = [scrub_value(v, depth + 1) for v in value]
        return items if isinstance(value, list) else tuple(items)
    try:
        text = repr(value)
    except Exception:  # a repr that fails may fail on data
        return f"<{type(value).__name__}>"
    return value if len(text) <= MAX_ARG_CHARS else f"<{type(value).__name__} (repr withheld)>"


def scrub_record(record: logging.LogRecord) -> logging.LogRecord:
    """Make one log record safe to format and emit (idempotent)."""
    if getattr(record, "medtee_scrubbed", False):
        return record
    if not isinstance(record.msg, str):
        record.msg = str(scrub_value(record.msg))
    if record.args:
        if record.name == "py.warnings":  # logging.captureWarnings: the formatted warning, source line included
            record.args = tuple(scrub_text(a) if isinstance(a, str) else scrub_value(a) for a in record.args) \
                if isinstance(record.args, tuple) else scrub_value(record.args)
        elif isinstance(record.args, Mapping):
            record.args = scrub_value(record.args)
        else:
            record.args = tuple(scrub_value(a) for a in record.args)
    if record.exc_info and record.exc_info[1] is not None:
        record.exc_text = "\n".join(failure_report(record.exc_info[1]))
        record.exc_info = None
    elif record.exc_text:  # pre-formatted elsewhere: keep only that it happened
        record.exc_text = "(exception text withheld)"
    record.medtee_scrubbed = True
    return record


class ScrubFilter(logging.Filter):
    """A handler filter: records that did not pass medtee's record factory are scrubbed before they are emitted."""

    def filter(self, record: logging.LogRecord) -> bool:
        scrub_record(record)
        return True


_FILTER = ScrubFilter()


def filter_handlers() -> int:
    """Attach the scrub filter to every handler of the root logger and of every logger created so far (idempotent;
    call again after importing libraries that add handlers). Returns the number of handlers covered."""
    loggers = [logging.getLogger()] + [lg for lg in logging.Logger.manager.loggerDict.values()
                                       if isinstance(lg, logging.Logger)]
    handlers = {id(h): h for lg in loggers for h in lg.handlers}
    for handler in handlers.values():
        if _FILTER not in handler.filters:
            handler.addFilter(_FILTER)
    return len(handlers)


def _install_record_factory() -> None:
    current = logging.getLogRecordFactory()
    if getattr(current, "medtee", False):
        return

    def factory(*args, **kwargs):
        return scrub_record(current(*args, **kwargs))

    factory.medtee = True
    logging.setLogRecordFactory(factory)


def _showwarning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings without their source line and with interpolated values withheld."""
    stream = file or sys.stderr
    try:
        stream.write(f"{filename}:{lineno}: {category.__name__}: {scrub_text(str(message))}\n")
    except (OSError, ValueError):  # a closed stream, as in the standard showwarning
        pass


# ---------------------------------------------------------------------------------------------- the containment


def filesystem_type(path: Path) -> str | None:
    """The type of the filesystem holding `path` (from /proc/self/mountinfo), or None where unknown."""
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None
    target, best, fstype = os.path.realpath(path), "", None
    for line in lines:
        left, _, right = line.partition(" - ")
        fields = left.split()
        if len(fields) < 5 or not right:
            continue
        mount = fields[4].replace("\\040", " ")
        if (target == mount or target.startswith(mount.rstrip("/") + "/")) and len(mount) >= len(best):
            best, fstype = mount, right.split()[0]
    return fstype


def memory_tmp_base() -> Path | None:
    """Where in-memory temporary files can go: $TMPDIR (or the default) if it is in memory, else /dev/shm."""
    for base in (Path(tempfile.gettempdir()), Path("/dev/shm")):
        if base.is_dir() and os.access(base, os.W_OK) and filesystem_type(base) in MEMORY_FILESYSTEMS:
            return base
    return None


def _no_core_dumps() -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    with contextlib.suppress(OSError, AttributeError):  # not Linux: RLIMIT_CORE alone
        import ctypes

        # Also covers a core_pattern pipe (systemd-coredump), which ignores RLIMIT_CORE; and bars ptrace attach.
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)


_SIGTERM = {"received": False, "deferred": 0}  # this run's SIGTERM state (`_terminated`)


def _terminated(signum, frame):
    """SIGTERM (a scheduler, `timeout`, `docker stop`) ends the run as an exception would: the teardown, the release's
    close, the receipt and the removal of the temporary directory all run. Only the first one: a second, e.g. from a
    process-group signal or torchrun forwarding it, must not cut the run's end short. Recorded only (the run ends
    when it can) while the run's end is under way (`sigterm_deferred`), or while Lightning's own SIGTERM handler is
    in place and calls this one: it then stops at the next step, on every rank (`lightning_sigterm`)."""
    if _SIGTERM["received"]:
        return
    _SIGTERM["received"] = True
    os.write(2, b"medtee: terminated (SIGTERM): ending the run\n")  # no print: this may interrupt a write to stderr
    if not _SIGTERM["deferred"] and signal.getsignal(signal.SIGTERM) is _terminated:
        raise SystemExit(128 + signum)


@contextlib.contextmanager
def sigterm_deferred():
    """A block a SIGTERM must not cut short (the run's end: teardown, close, receipt); one that came meanwhile ends
    the run after it (exit 143), unless an exception is on its way out already."""
    _SIGTERM["deferred"] += 1
    try:
        yield
    finally:
        _SIGTERM["deferred"] -= 1
    if _SIGTERM["received"]:
        raise SystemExit(128 + signal.SIGTERM)


@contextlib.contextmanager
def lightning_sigterm():
    """Around Lightning's fit/validate: a SIGTERM before Lightning installs its handler ends the run at once; after,
    Lightning stops at the next step (its SIGTERMException carries no exit status, so it becomes 143 here); one
    Lightning let the loop finish through ends the run after it. Lightning ends a fit that Ctrl-C interrupted with
    `sys.exit(1)`: that is a KeyboardInterrupt again here (exit 130 once the run has ended)."""
    try:
        yield
    except SystemExit as exc:
        if _SIGTERM["received"]:
            raise SystemExit(128 + signal.SIGTERM) from None
        if isinstance(exc.__context__, KeyboardInterrupt):
            raise KeyboardInterrupt from None
        raise
    if _SIGTERM["received"]:
        raise SystemExit(128 + signal.SIGTERM)


@contextlib.contextmanager
def contained():
    """The containment of one run: no core dumps, offline libraries, scrubbed logs, warnings and uncaught
    exceptions, a private (0700) temporary directory in memory, removed when the run ends, also on SIGTERM."""
    _no_core_dumps()
    os.environ.update(OFFLINE_ENV)
    _install_record_factory()
    filter_handlers()
    warnings.showwarning = _showwarning
    sys.excepthook, threading.excepthook, sys.unraisablehook = _excepthook, _thread_excepthook, _unraisablehook
    base = memory_tmp_base()
    if base is None:
        log.warning("no memory filesystem (tmpfs) found: temporary files go to %s on disk", tempfile.gettempdir())
    private = Path(tempfile.mkdtemp(prefix="medtee-", dir=base))
    saved = os.environ.get("TMPDIR"), tempfile.tempdir
    os.environ["TMPDIR"] = tempfile.tempdir = str(private)
    main = threading.current_thread() is threading.main_thread()
    _SIGTERM.update(received=False, deferred=0)
    previous = signal.signal(signal.SIGTERM, _terminated) if main else None
    try:
        yield private
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if saved[0] is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = saved[0]
        tempfile.tempdir = saved[1]
        shutil.rmtree(private, ignore_errors=True)


# ------------------------------------------------------------------------------------------------------- egress


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")


def egress_problems(*, tracking_uri: str | None, broker_url: str, weights_id: str | None,
                    data_path: str | None, sweep_storage: str | None = None) -> list[str]:
    """Why a production run may not start: any network egress other than the tracking server, the key broker
    (`broker_url`) and a sweep's study storage the operator declared (`sweep_storage`: MEDTEE_SWEEP_STORAGE, see
    `storage_egress_problems`), weights (`weights_id`: the pretrained model's id or directory) or
    a sealed dataset named by URL, or a temporary directory that is not in memory."""
    problems = storage_egress_problems(sweep_storage)
    uri = str(tracking_uri or "")
    endpoints = []
    scheme = urlsplit(uri).scheme
    if scheme == "https":
        endpoints.append(("tracking.tracking_uri", uri))
        if _truthy("MLFLOW_TRACKING_INSECURE_TLS"):
            problems.append("MLFLOW_TRACKING_INSECURE_TLS is set: production profiles verify the tracking server's "
                            "certificate; unset it (or set MLFLOW_TRACKING_SERVER_CERT_PATH to its CA bundle)")
    elif scheme != "sqlite":
        problems.append(f"tracking.tracking_uri uses '{scheme or uri}': production profiles log to a local sqlite "
                        f"file or to an MLflow tracking server over https:// only (tracking=mlflow_server)")
    if broker_url.startswith(("http://", "https://")):
        endpoints.append(("broker.url", broker_url))
    for key, url in endpoints:
        parts = urlsplit(url)
        if parts.username or parts.password:
            problems.append(f"{key} carries credentials in the URL, which would be printed and recorded; put them "
                            f"in the environment (MLFLOW_TRACKING_TOKEN or MLFLOW_TRACKING_USERNAME/PASSWORD)")
        proxies = urllib.request.getproxies_environment()
        if parts.scheme in proxies and not urllib.request.proxy_bypass_environment(parts.hostname or ""):
            problems.append(f"{key} would go through the proxy in {parts.scheme.upper()}_PROXY/ALL_PROXY, a host "
                            f"the recipe does not name; unset the proxy or add {parts.hostname} to NO_PROXY")
    if "://" in str(weights_id or ""):
        problems.append("model.id is a URL: production profiles load weights from a local directory or the "
                        "offline Hugging Face cache only")
    if "://" in str(data_path or ""):
        problems.append("data.path is a URL: production profiles read the sealed dataset from a local directory")
    if memory_tmp_base() is None:
        problems.append(f"no memory filesystem for temporary files ({tempfile.gettempdir()} and /dev/shm are not "
                        f"tmpfs): mount one, or point TMPDIR at one")
    return problems


# ------------------------------------------------------------------------------------------------ study storage


#: Where the operator names the one PostgreSQL study storage that may receive the operator's credentials, and that
#: a production sweep may connect to: `sweep.storage` must be that URL (`postgresql://` and `postgresql+psycopg://`
#: count as the same).
OPERATOR_STORAGE = "MEDTEE_SWEEP_STORAGE"


def same_storage(a: str, b: str) -> bool:
    """Whether two storage URLs are the same text, `postgresql://` read as `postgresql+psycopg://` (the engine does)."""
    def norm(url: str) -> str:
        return "postgresql+psycopg://" + url[len("postgresql://"):] if url.startswith("postgresql://") else url

    return norm(a.strip()) == norm(b.strip())


def storage_hosts(url: str, environ: Mapping[str, str] | None = None) -> list[str]:
    """The hosts a PostgreSQL storage URL names (in the URL's authority and its `host=` options; '' for none, and
    with `environ` given, PGHOST's when the URL names none); socket directories start with '/' or '@'."""
    parts = urlsplit(url)
    if not parts.scheme.startswith("postgresql"):
        return []
    hosts = [_without_port(unquote(item)) for item in parts.netloc.rpartition("@")[2].split(",")]
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key == "host":
            hosts += value.split(",")
    hosts = [h for h in hosts if h]
    if not hosts and environ is not None:
        hosts = [h for h in environ.get("PGHOST", "").split(",") if h]
    return hosts or [""]


def _without_port(item: str) -> str:
    if item.startswith("["):  # [IPv6]:PORT
        return item[1:].partition("]")[0]
    return item.rpartition(":")[0] if item.count(":") == 1 else item


def is_local_host(host: str) -> bool:
    """A Unix socket (no host, a directory, an abstract socket) or a loopback address: no network."""
    if host in ("", "localhost") or host.startswith(("/", "@")):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def storage_egress_problems(url: str | None, environ: Mapping[str, str] | None = None) -> list[str]:
    """Why a production sweep may not connect to its study storage: a PostgreSQL server must be the one the operator
    declared in MEDTEE_SWEEP_STORAGE, and one that is not on this machine must be verified (sslmode=verify-full, from
    the URL or PGSSLMODE). A sqlite storage (the default) is a local file."""
    environ = os.environ if environ is None else environ
    if not url or urlsplit(url).scheme == "sqlite":
        return []
    hosts = storage_hosts(url, environ)
    named = ", ".join(h or "the default socket" for h in hosts)
    if not same_storage(url, environ.get(OPERATOR_STORAGE, "")):
        return [f"sweep.storage connects to {named}, which the operator did not declare: production profiles "
                f"connect only to the tracking server, the key broker and the study storage named in "
                f"{OPERATOR_STORAGE}; set {OPERATOR_STORAGE} to the same URL, or keep the study in sqlite "
                f"(sweep.storage=null)"]
    remote = [h for h in hosts if not is_local_host(h)]
    mode = dict(parse_qsl(urlsplit(url).query)).get("sslmode") or environ.get("PGSSLMODE") or "prefer"
    if remote and mode != "verify-full":
        return [f"sweep.storage connects to {', '.join(remote)} with sslmode={mode}: production profiles verify the "
                f"study server's certificate; add sslmode=verify-full (and sslrootcert=CA) to the URL"]
    return []


# -------------------------------------------------------------------------------------------------- progress bar


def progress_bars(enabled: bool, allowed) -> list:
    """Lightning callbacks: when enabled, one progress bar over the run's optimizer steps showing only the allowed
    metric names."""
    if not enabled:
        return []
    from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
    from lightning.pytorch.callbacks.progress.rich_progress import _RICH_AVAILABLE

    keep = frozenset(allowed)

    class AllowListed:
        """Shows only allow-listed metrics (no version number, no other logged value), and validation metrics only of
        a pass over at least the module's `min_aggregate` held-out rows (else `val/loss` may be one dialogue's)."""

        def get_metrics(self, trainer, pl_module):
            shown = {k: v for k, v in super().get_metrics(trainer, pl_module).items() if k in keep}
            if getattr(pl_module, "val_examples", 0) < getattr(pl_module, "min_aggregate", 1):
                shown = {k: v for k, v in shown.items() if not k.startswith(("val/", "eval/"))}
            return shown

    if not _RICH_AVAILABLE:
        return [type("AllowListedProgressBar", (AllowListed, TQDMProgressBar), {})()]

    class StepProgressBar(AllowListed, RichProgressBar):
        """Lightning's rich progress bar counting the run's optimizer steps ("step 37/60": a run is sized by
        trainer.max_steps), not an epoch's batches."""

        @property
        def total_train_batches(self):
            return self.trainer.max_steps

        def _get_train_description(self, current_epoch: int) -> str:
            return "Training steps"

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            self._update(self.train_progress_bar_id, trainer.global_step)
            self.refresh()

    return [StepProgressBar()]


class _NoAdvertisements(logging.Filter):
    """Drops Lightning's "💡 Tip: try installing ..." lines (advertisements for cloud services, not run state)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip")


def quiet_lightning() -> None:
    """Install the filter on Lightning's rank-zero logger (idempotent)."""
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _NoAdvertisements) for f in logger.filters):
        logger.addFilter(_NoAdvertisements())
