"""Signed training receipts: an in-toto Statement (predicate `https://medtee.dev/receipt/v1`) in a DSSE envelope,
signed by an in-memory Ed25519 key bound into the run's attestation evidence; verified offline. See docs/receipt.md.

Modules: statement (build the Statement, `source_digest`), signing (`ReceiptSigner`, `write_receipt`), verify
(`verify_receipt`), cli (`medtee receipt verify`). Light to import: securesystemslib loads when signing or verifying.
"""
