"""Sealed data: sealing to encrypted Parquet, the TEE-side reader. The key broker is medtee.broker; HPKE, signing
keys and sealed blobs are medtee.crypto.

Modules: manifest (signed dataset manifest, dataset ids), pme_keys (the in-memory Parquet Modular Encryption key
client), seal (data owner's sealing), reader (TEE-side integrity checks and in-memory decryption), config (the
`encryption` config group schema), cli (seal, data, keys subcommands).
"""
