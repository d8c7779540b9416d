"""Causal-LM cross-entropy from the final hidden states, chunked: full-vocabulary logits are never materialised.

Only supervised positions (labels != -100 after the causal shift) go through the output layer, in chunks of
`chunk_tokens`; each chunk's logits are recomputed in the backward pass (non-reentrant checkpoint), so at most one
chunk of `chunk_tokens x vocabulary` logits exists at a time. The result equals transformers' causal-LM loss (the
mean over supervised tokens), final logit soft-capping included.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from medtee.data.chat import IGNORE_INDEX


def _chunk_loss(output_layer, hidden: torch.Tensor, targets: torch.Tensor, softcap: float | None) -> torch.Tensor:
    logits = output_layer(hidden).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits, targets, reduction="sum")


def chunked_causal_lm_loss(hidden: torch.Tensor, output_layer, labels: torch.Tensor, *, chunk_tokens: int,
                           softcap: float | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy over supervised positions.

    hidden: (batch, seq, width) final hidden states; output_layer: the LM head (a module or callable mapping width to
    vocabulary); labels: (batch, seq) with IGNORE_INDEX where no loss. A batch with no supervised token gives 0
    (still connected to the graph). transformers' loss gives NaN there.
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    targets = labels[:, 1:].reshape(-1)
    supervised = (targets != IGNORE_INDEX).nonzero().squeeze(-1)
    states = hidden[:, :-1].reshape(-1, hidden.shape[-1]).index_select(0, supervised)
    targets = targets.index_select(0, supervised)
    if targets.numel() == 0:  # nothing to learn from, but backward must still reach the graph
        return hidden.sum().float() * 0.0
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, targets.numel(), chunk_tokens):
        end = start + chunk_tokens
        total = total + checkpoint(_chunk_loss, output_layer, states[start:end], targets[start:end], softcap,
                                   use_reentrant=False)
    return total / targets.numel()
