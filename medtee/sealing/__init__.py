"""Sealed data and key release: HPKE key wrapping, sealing to encrypted Parquet, the TEE-side reader, key brokers.

Modules: keywrap (HPKE, sealed blobs), manifest (signed dataset manifest), kms (Parquet Modular Encryption keys),
seal (data owner's sealing), reader (TEE-side integrity checks and in-memory decryption), broker (embedded broker,
release protocol, rotation), http_broker (HTTP service and client), audit (hash-chained log), owner (signing key),
config (the `encryption` config group schema), cli (subcommands).
"""
