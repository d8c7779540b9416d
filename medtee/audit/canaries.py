"""Canaries: random secrets from a known candidate space, sealed into the dataset by the data owner.

Format (`DEFAULT_SPACE`): the sentence ``Patient MRN: NNNNNNN.``, the number uniform over the 10^7 seven-digit
strings (leading zeros kept). Each canary is a synthetic record of its own, added to the dataset (the real
dialogues are never changed): the fixed patient turn `CANARY_PROMPT`, then the canary as the whole doctor turn,
the text training supervises. Its id is `canary-` and 16 random hex digits, so the TEE can tell canary records
from real ones. Per repeat count r of the schedule, `per_repeat` canaries are inserted r times each; `per_repeat`
more ("controls", `repeats == 0`) are drawn from the same space and never inserted. Copies are shuffled and put at
uniformly random positions among the real records.

The canaries are secrets: `Canary` and `CanaryPlan` never show a number in their repr, and the list is stored only
encrypted (`encrypt_canaries`: AES-256-GCM under a key derived from the dataset's data key). Imports nothing heavy.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

CANARY_PROMPT = "Please read my medical record number back to me."  # the patient turn of every canary record
CANARY_ID_PREFIX = "canary-"
CANARY_FILE = "canaries.enc"  # the encrypted side file in a sealed dataset
DEFAULT_REPEATS = (1, 4, 16, 64)
#: Bounds of one sealing's canaries. The audit's groups need tens of canaries each (docs/audit.md uses 10); 1000 per
#: repeat count is far past any use and still takes about a second to draw. Each copy is an added record: at most
#: MAX_CANARY_RECORDS of them (N x the sum of the repeat counts), so a typo cannot swell a dataset without bound.
MAX_CANARIES_PER_REPEAT = 1000
MAX_CANARY_RECORDS = 100_000
_MAGIC = b"MTC1"
_INFO = b"medtee/canaries/v1\0"


@dataclass(frozen=True)
class CanarySpace:
    """Candidate canaries: `template` with its one `{}` replaced by a `digits`-digit number (leading zeros kept)."""

    template: str = "Patient MRN: {}."
    digits: int = 7

    def __post_init__(self) -> None:
        if not isinstance(self.template, str) or self.template.count("{}") != 1 or self.template.count("{") != 1:
            raise ValueError("a canary template needs exactly one '{}' (where the number goes) and no other braces")
        if not isinstance(self.digits, int) or isinstance(self.digits, bool) or not 1 <= self.digits <= 18:
            raise ValueError(f"canary digits must be an int from 1 to 18, got {self.digits!r}")

    @property
    def size(self) -> int:
        """The number of candidates, 10**digits."""
        return 10 ** self.digits

    def render(self, number: int) -> str:
        """The canary sentence of `number` (0 <= number < size)."""
        if not isinstance(number, int) or isinstance(number, bool) or not 0 <= number < self.size:
            raise ValueError(f"a canary number must be an int in [0, {self.size})")
        return self.template.replace("{}", f"{number:0{self.digits}d}")

    def sample(self, rng: random.Random) -> int:
        """One candidate number, uniform over the space."""
        return rng.randrange(self.size)

    def distinct(self, rng: random.Random, k: int, *, exclude: Sequence[int] = ()) -> list[int]:
        """`k` distinct candidate numbers, uniform over the space less `exclude`."""
        excluded = set(exclude)
        if k < 0 or k + len(excluded) > self.size:
            raise ValueError(f"cannot draw {k} distinct canaries from a space of {self.size} less {len(excluded)}")
        return [n for n in rng.sample(range(self.size), k + len(excluded)) if n not in excluded][:k]


DEFAULT_SPACE = CanarySpace()


@dataclass(frozen=True)
class Canary:
    """One canary: its number in `space` and how often it was inserted (0: a never-inserted control)."""

    number: int = field(repr=False)
    repeats: int
    space: CanarySpace = DEFAULT_SPACE

    @property
    def text(self) -> str:
        """The canary sentence (the doctor turn of its records)."""
        return self.space.render(self.number)


def canary_dialogue(text: str) -> list[dict]:
    """The messages of a canary record: `CANARY_PROMPT` as the patient, `text` as the doctor."""
    return [{"role": "user", "content": CANARY_PROMPT}, {"role": "assistant", "content": text}]


@dataclass(frozen=True)
class CanaryPlan:
    """The canaries of one sealing and where their records go: `insertions` are `(p, record)` pairs, sorted by p,
    each record to follow the p-th of `real_records` real records (p = 0: before the first)."""

    canaries: tuple[Canary, ...]
    real_records: int
    insertions: tuple[tuple[int, dict], ...] = field(repr=False)

    @property
    def inserted(self) -> int:
        return sum(c.repeats > 0 for c in self.canaries)

    @property
    def controls(self) -> int:
        return sum(c.repeats == 0 for c in self.canaries)


def parse_repeats(text: str) -> tuple[int, ...]:
    """`"1,4,16,64"` as (1, 4, 16, 64): distinct positive ints."""
    try:
        repeats = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise ValueError(f"--canary-repeats must be comma-separated positive integers such as 1,4,16,64, got "
                         f"{text!r}") from None
    if not repeats or min(repeats) < 1 or len(set(repeats)) != len(repeats):
        raise ValueError("--canary-repeats must be distinct positive integers such as 1,4,16,64")
    return repeats


def check_plan_size(per_repeat: int, repeats: Sequence[int] = DEFAULT_REPEATS) -> None:
    """ValueError naming the flag and the bound when `per_repeat` x `repeats` is outside the limits above."""
    if per_repeat < 1:
        raise ValueError(f"--canaries must be at least 1, got {per_repeat}")
    if per_repeat > MAX_CANARIES_PER_REPEAT:
        raise ValueError(f"--canaries must be at most {MAX_CANARIES_PER_REPEAT} (got {per_repeat}); the audit needs "
                         f"tens per repeat count (docs/audit.md)")
    records = per_repeat * sum(repeats)
    if records > MAX_CANARY_RECORDS:
        raise ValueError(f"--canaries {per_repeat} with --canary-repeats {','.join(map(str, repeats))} adds {records} "
                         f"canary records; at most {MAX_CANARY_RECORDS} are allowed: lower N or the repeat counts")


def plan_canaries(per_repeat: int, repeats: Sequence[int] = DEFAULT_REPEATS, *, real_records: int,
                  seed: int | None = None, space: CanarySpace = DEFAULT_SPACE) -> CanaryPlan:
    """`per_repeat` canaries for each repeat count, and `per_repeat` controls, all distinct, placed among
    `real_records` records (within `check_plan_size`'s limits). Without `seed` the draw uses the OS's randomness
    (the canaries are secrets); with one it is reproducible by anyone who knows the seed (tests)."""
    check_plan_size(per_repeat, repeats)
    if real_records < 1:
        raise ValueError("canaries need at least one real record to go between")
    rng = random.Random(seed) if seed is not None else random.SystemRandom()
    numbers = space.distinct(rng, per_repeat * (len(repeats) + 1))
    schedule = [r for r in repeats for _ in range(per_repeat)] + [0] * per_repeat
    canaries = tuple(Canary(n, r, space) for n, r in zip(numbers, schedule))
    copies = [c for c in canaries for _ in range(c.repeats)]
    rng.shuffle(copies)
    positions = sorted(rng.randrange(real_records + 1) for _ in copies)
    insertions = tuple((p, {"id": f"{CANARY_ID_PREFIX}{rng.getrandbits(64):016x}", "messages": canary_dialogue(c.text)})
                       for p, c in zip(positions, copies))
    return CanaryPlan(canaries=canaries, real_records=real_records, insertions=insertions)


def _aead(data_key: bytes, dataset_id: str) -> tuple[AESGCM, bytes]:
    info = _INFO + dataset_id.encode("utf-8")
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(bytes(data_key))
    return AESGCM(key), info


def encrypt_canaries(canaries: Sequence[Canary], data_key: bytes, dataset_id: str) -> bytes:
    """The side file: `MTC1 | 12-byte nonce | AES-256-GCM(JSON list)`, keyed by HKDF(data key, dataset id)."""
    spaces = {c.space for c in canaries}
    if len(spaces) != 1:
        raise ValueError("the canaries of one dataset must come from one canary space")
    (space,) = spaces
    payload = json.dumps({"template": space.template, "digits": space.digits,
                          "canaries": [[c.number, c.repeats] for c in canaries]}).encode("utf-8")
    aead, info = _aead(data_key, dataset_id)
    nonce = os.urandom(12)
    return _MAGIC + nonce + aead.encrypt(nonce, payload, _MAGIC + info)


def decrypt_canaries(blob: bytes, data_key: bytes, dataset_id: str) -> list[Canary]:
    """The canaries of an `encrypt_canaries` file; ValueError if it is not one, or not for this key and dataset."""
    if blob[:4] != _MAGIC or len(blob) < 4 + 12 + 16:
        raise ValueError("not a medtee canary file")
    aead, info = _aead(data_key, dataset_id)
    try:
        doc = json.loads(aead.decrypt(blob[4:16], blob[16:], _MAGIC + info))
        space = CanarySpace(doc["template"], doc["digits"])
        return [Canary(number, repeats, space) for number, repeats in doc["canaries"]]
    except InvalidTag:
        raise ValueError("the canary file does not decrypt under this dataset's key (altered or swapped)") from None
    except (KeyError, TypeError, ValueError):
        raise ValueError("the canary file decrypts but is malformed") from None
