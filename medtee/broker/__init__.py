"""The data owner's key broker: releases a dataset's data key only to a TEE whose evidence satisfies its policy.

Modules: protocol (the KeyBroker contract, request validation, the TEE's client half `obtain_data_key`, `connect`),
service (EmbeddedBroker, the owner's service; key rotation), audit (hash-chained log), server (the HTTP service:
Starlette on uvicorn), client (HttpBroker), cli (`medtee broker serve|audit|policy`). See docs/broker.md.
"""
