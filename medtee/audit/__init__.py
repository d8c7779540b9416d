"""Memorization audit: canaries the data owner seals into the dataset, their exposure (Carlini et al. 2019, "The
Secret Sharer"), and verbatim extraction of training text. See docs/audit.md.

`canaries` and `exposure` import nothing heavy (the sealer uses `canaries`); `probe` imports torch.
"""
