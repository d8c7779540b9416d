"""Schema of the `tracking` config group, and medtee's metric allow-list. Imports nothing heavy."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

from medtee.audit.config import REPORTED_REPEATS
from medtee.evaluation.config import EVAL_MEASURES, EVAL_STATISTICS
from medtee.schema import below_minimums

#: Metrics medtee may ever send to MLflow, named `stage/metric`. Recipes can only narrow this list (tracking.metrics).
METRIC_ALLOW_LIST = (
    "train/loss",
    "train/lr",
    "train/tokens_per_s",
    "train/grad_norm",
    "train/epoch",
    "train/epsilon",
    "val/loss",
    "val/perplexity",
    *(f"eval/{measure}_{statistic}" for measure in EVAL_MEASURES for statistic in EVAL_STATISTICS),
    *(f"audit/{side}exposure_{stat}_{r}x" for side in ("", "base_") for stat in ("max", "median")
      for r in REPORTED_REPEATS),
    *(f"audit/{side}extraction_{m}" for side in ("", "base_") for m in ("exact_rate", "run_mean", "examples")),
    "audit/extraction_exact_rate_above_base",
    "audit/extraction_exact_above_base_upper",
    *(f"audit/extraction_{m}_{k}" for m in ("run", "exact") for k in ("delta", "ci_low", "ci_high")),
)

#: MLflow tracking URI schemes a recipe may name (any other scheme selects an MLflow store plugin: code).
TRACKING_SCHEMES = ("sqlite", "http", "https")

#: The settings MLflow reads for a tracking server's requests (`mlflow.utils.credentials.get_default_host_creds`),
#: by the name the operator set them under; username and password also come from ~/.mlflow/credentials.
HOST_SETTINGS = {"username": "MLFLOW_TRACKING_USERNAME", "password": "MLFLOW_TRACKING_PASSWORD",
                 "token": "MLFLOW_TRACKING_TOKEN", "auth": "MLFLOW_TRACKING_AUTH",
                 "aws_sigv4": "MLFLOW_TRACKING_AWS_SIGV4", "ignore_tls_verification": "MLFLOW_TRACKING_INSECURE_TLS",
                 "client_cert_path": "MLFLOW_TRACKING_CLIENT_CERT_PATH",
                 "server_cert_path": "MLFLOW_TRACKING_SERVER_CERT_PATH"}


@dataclass
class TrackingConfig:
    # MLflow store: sqlite:///FILE (relative to the current directory) or http(s)://HOST of a tracking server;
    # None (tracking=mlflow_server) takes the server's URL from MLFLOW_TRACKING_URI when the run starts
    tracking_uri: Optional[str] = "sqlite:///mlflow.db"
    experiment: str = "medtee"  # MLflow experiment name
    run_name: Optional[str] = None  # MLflow run name; None uses the recipe name
    metrics: Optional[List[str]] = None  # narrows medtee's metric allow-list (None keeps all of it); cannot widen it
    min_aggregate: int = 20  # evaluation metrics over fewer examples than this are suppressed

    def problems(self) -> list[str]:
        out = below_minimums(self, "tracking", {"min_aggregate": 1})
        uri = self.tracking_uri
        if uri is not None and uri.partition(":")[0] not in TRACKING_SCHEMES:
            out.append(f"tracking.tracking_uri={uri!r}: MLflow stores are named sqlite:///FILE or "
                       f"http(s)://HOST (tracking=mlflow_server reads MLFLOW_TRACKING_URI)")
        elif uri is not None and uri.partition(":")[0] == "sqlite" and ("?" in uri or "#" in uri):
            # SQLAlchemy reads query options (`plugin=` loads code by entry point) after '?', even behind a '#'
            out.append(f"tracking.tracking_uri={uri.split('?')[0].split('#')[0]!r} carries query options or a "
                       f"fragment: a sqlite store takes none ('?', '#'); write sqlite:///FILE")
        if self.metrics is not None:
            extra = sorted(set(self.metrics) - set(METRIC_ALLOW_LIST))
            if extra:
                out.append(f"tracking.metrics may only narrow medtee's allow-list; not allowed: {', '.join(extra)}. "
                           f"Allowed: {', '.join(METRIC_ALLOW_LIST)}")
        return out

    def allowed_metrics(self) -> tuple[str, ...]:
        """The metrics this run may log: the recipe's narrowing of the allow-list, or all of it."""
        return tuple(m for m in METRIC_ALLOW_LIST if self.metrics is None or m in self.metrics)


def credential_sources(uri: str) -> list[str]:
    """What MLflow would send to (or use with) the tracking server `uri`: the settings of HOST_SETTINGS that MLflow's
    own reader finds (the environment, and ~/.mlflow/credentials for username and password) and a ~/.netrc entry
    for its host (requests adds it to a request without credentials). Imports mlflow: call it only when needed."""
    import os

    try:
        from requests.utils import get_netrc_auth
        from mlflow.utils.credentials import get_default_host_creds

        creds = vars(get_default_host_creds(uri))
        netrc = get_netrc_auth(uri)
    except Exception as exc:  # a malformed credentials file or boolean: MLflow could not say what it would send
        return [f"MLflow's credential settings (unreadable: {type(exc).__name__})"]
    found = []
    for key, value in creds.items():
        if key == "host" or not value:
            continue
        name = HOST_SETTINGS.get(key, f"MLflow's {key}")
        if key in ("username", "password") and not os.environ.get(name):
            name = "~/.mlflow/credentials"
        if name not in found:
            found.append(name)
    if netrc:
        found.append("NETRC" if os.environ.get("NETRC") else "~/.netrc")
    return found
