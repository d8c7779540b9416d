"""Hyperparameter sweeps that survive: an Optuna study over recipe fields, resumable and shared by workers.

Modules: config (the `sweep` group's schema, the search space as recipe overrides; imports nothing heavy), guard
(what a study may store), engine (ask and tell, heartbeats, retries of dead workers' trials; imports optuna),
tracking (one MLflow parent run per study, one child per trial, through the guarded logger).
"""
