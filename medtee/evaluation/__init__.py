"""Evaluation without the model: statistics (`stats`), reply scores (`scores`), the clinician study's ratings and
blinding (`ratings`), the self-contained HTML report (`report`) and `medtee eval ratings` (`cli`).

Importing this package imports nothing heavy; scipy, matplotlib, sacrebleu and rouge-score load with the module
that needs them.
"""
