"""medtee's cryptography, a small API over `cryptography`'s primitives; imports nothing heavy (no torch, no pyarrow).

Modules: hpke (schemes, in-memory key handles, key files, wrapping a secret to a public key), blob (sealed blobs:
payloads encrypted to a public key), signing (the data owner's Ed25519 key), stream (the checkpoint stream cipher,
its key derivation and versioned file format).
"""
