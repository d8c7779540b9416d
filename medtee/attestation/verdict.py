"""The outcome of an appraisal: every check with what was expected and what was found."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Check:
    """One appraisal check; `expected` and `actual` are short printable values (never secrets or record contents)."""

    name: str
    ok: bool
    expected: str
    actual: str


@dataclass(frozen=True)
class Verdict:
    """All checks of one appraisal; `ok` only when there is at least one check and every check passed."""

    ok: bool
    checks: tuple[Check, ...]
    simulated: bool
    policy: str

    @classmethod
    def of(cls, checks: list[Check] | tuple[Check, ...], *, simulated: bool, policy: str) -> Verdict:
        """Build a verdict whose `ok` follows from its checks."""
        checks = tuple(checks)
        return cls(ok=bool(checks) and all(c.ok for c in checks), checks=checks, simulated=simulated, policy=policy)

    def failures(self) -> tuple[Check, ...]:
        """The checks that failed."""
        return tuple(c for c in self.checks if not c.ok)

    def explain(self) -> str:
        """One line per failed check with expected and actual (or a one-line acceptance)."""
        if self.ok:
            tag = " (SIMULATED: protects nothing)" if self.simulated else ""
            return f"accepted under policy '{self.policy}': {len(self.checks)} checks passed{tag}"
        if not self.checks:
            return f"rejected under policy '{self.policy}': no checks were run"
        return "\n".join(f"{c.name}: expected {c.expected}, got {c.actual}" for c in self.failures())

    def to_json(self) -> dict:
        """A JSON-ready form (for `medtee attest verify --json` and receipts)."""
        return {
            "ok": self.ok,
            "policy": self.policy,
            "simulated": self.simulated,
            "checks": [{"name": c.name, "ok": c.ok, "expected": c.expected, "actual": c.actual} for c in self.checks],
        }


def check(name: str, ok: bool, expected: object, actual: object) -> Check:
    """Shorthand that stringifies expected/actual."""
    return Check(name=name, ok=bool(ok), expected=str(expected), actual=str(actual))
