"""Schema of the `broker` config group: which key broker a run asks for the data key. Imports nothing heavy."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

from medtee.broker.protocol import DEFAULT_BROKER_DIR, is_loopback_url
from medtee.schema import below_minimums

EMBEDDED = "embedded"


@dataclass
class BrokerConfig:
    # "embedded" (in-process, its store in `dir`: development) or the http(s):// URL of `medtee broker serve`
    url: str = EMBEDDED
    # the embedded broker's store (keys, registrations, audit log), relative to the current directory; with a remote
    # broker it holds only the data owner's signing key used by `medtee seal`. Not in the recipe digest.
    dir: str = str(DEFAULT_BROKER_DIR)
    ca: str = ""  # remote broker: CA bundle (PEM) that signed its https certificate; "" uses the system trust store
    timeout_s: float = 30.0  # remote broker: seconds to wait for each request

    def problems(self) -> list[str]:
        out = below_minimums(self, "broker", {"timeout_s": 0.1})
        url = str(self.url)
        if url != EMBEDDED and urlsplit(url).scheme not in ("http", "https"):
            out.append(f"broker.url={url!r}: use 'embedded' or an http(s):// URL")
        elif url.startswith("http://") and not is_loopback_url(url):
            out.append(f"broker.url={url}: plain http is allowed only on loopback (127.0.0.1, ::1, localhost); "
                       f"serve the broker with TLS and use https://")
        return out

    def is_remote(self) -> bool:
        return str(self.url).startswith(("http://", "https://"))
