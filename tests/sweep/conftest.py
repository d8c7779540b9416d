"""The sweep tests' helpers (the fake runner and worker, the checks) are modules of this directory, imported as
`from sweep import sweep_checks, sweep_worker` (tests/ is on the path; no sys.path change, so `conftest` stays the
suite's own)."""
