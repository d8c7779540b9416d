"""Milliseconds to verify one SEV-SNP report with a cached VCEK (authenticity policy): run from the repo root.

    .venv/bin/python benchmarks/attestation_verify.py [--n 200]
Uses ../shared/vectors (the sibling of the repository); the target is < 20 ms per verification.
"""

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

from medtee.attestation import Evidence, appraise, load_policy
from medtee.attestation.amd import CertCache
from medtee.attestation.snp import SnpReport

VECTORS = Path(__file__).resolve().parents[1] / ".." / "shared" / "vectors" / "snp"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=200)
    n = parser.parse_args().n
    raw = (VECTORS / "automata/report.bin").read_bytes()
    with tempfile.TemporaryDirectory() as cache:
        CertCache(cache).put_vcek("Milan", SnpReport.parse(raw), (VECTORS / "automata/vek_cert.der").read_bytes())
        policy = dataclasses.replace(load_policy("authenticity"), cert_cache_dir=cache)
        evidence = Evidence(provider="file", snp_report=raw)
        assert appraise(evidence, policy, expected_report_data=None).ok  # warm: pinned roots verified once
        start = time.perf_counter()
        for _ in range(n):
            verdict = appraise(evidence, policy, expected_report_data=None)
        per = (time.perf_counter() - start) / n * 1000
    assert verdict.ok
    print(f"SEV-SNP verification with cached VCEK: {per:.2f} ms per report ({n} runs); target < 20 ms: "
          f"ratio {per / 20:.2f}")


if __name__ == "__main__":
    main()
