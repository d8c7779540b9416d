"""Tracking: what a run may tell MLflow, and the only code that talks to it.

Modules: config (the `tracking` group's schema, the metric allow-list), guard (the privacy guard: allow-lists of
metrics, parameters, tags and artifacts; aggregates only), logger (the guarded MLflow logger, provenance tags, the
sealed dataset as a dataset input; imports lightning and mlflow).
"""
