"""Sealed data: HPKE key wrapping, sealing to encrypted Parquet, the TEE-side reader. The key broker is medtee.broker.

Modules: keywrap (HPKE, sealed blobs), manifest (signed dataset manifest, dataset ids), kms (Parquet Modular
Encryption keys), seal (data owner's sealing), reader (TEE-side integrity checks and in-memory decryption), owner
(signing key), config (the `encryption` config group schema), cli (seal, data, keys subcommands).
"""
