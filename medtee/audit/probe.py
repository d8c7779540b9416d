"""Probing a causal LM (a `transformers` model or a peft model around one) for memorization, in memory only.

- `log_perplexities`: -log2 P(canary | chat context) of candidate canaries, each scored as the doctor turn of a
  canary record (`canaries.canary_dialogue`) in the Gemma 3 chat text training uses (`medtee.data.chat`): the sum
  over the tokens training supervises (the turn's content and its <end_of_turn>). The tokens before the turn are
  the same for every candidate, so leaving them out changes no rank.
- `canary_exposures`: those for a dataset's canaries and a reference set drawn from the same space, as exposures
  per repeat count (0: the never-inserted controls).
- `extraction_rates`: greedy continuations of prompts compared with the true continuations token by token;
  `doctor_turn_examples` cuts such prompts and truths from chat dialogues.

Batched, in eval mode, under `torch.inference_mode`; deterministic on CPU. Returns numbers only; nothing is
logged or written (the texts scored are secrets or training data).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import numpy as np
import torch

from medtee.audit.canaries import Canary, canary_dialogue
from medtee.audit.exposure import exposure_extrapolation, exposure_interpolation
from medtee.data.chat import IGNORE_INDEX, encode_arrays

METHODS = {"interpolation": exposure_interpolation, "extrapolation": exposure_extrapolation}


class _EvalMode:
    """The model in eval mode for the block, its previous mode restored after."""

    def __init__(self, model):
        self._model, self._was_training = model, model.training

    def __enter__(self):
        self._model.eval()
        return self._model

    def __exit__(self, *exc) -> None:
        self._model.train(self._was_training)


def _device(model) -> torch.device:
    return next(model.parameters()).device


def log_perplexities(model, tokenizer, texts: Sequence[str], *, batch_size: int = 32,
                     max_length: int = 512) -> np.ndarray:
    """-log2 P(text as the doctor's turn | the canary record's patient turn) under `model`, per text (float64)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    encoded = encode_arrays(tokenizer, [canary_dialogue(t) for t in texts], max_length=max_length)
    out = np.empty(len(encoded), np.float64)
    device = _device(model)
    with _EvalMode(model), torch.inference_mode():
        for start in range(0, len(encoded), batch_size):
            chunk = encoded[start:start + batch_size]
            width = max(len(ids) for ids, _ in chunk)
            ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
            labels = torch.full((len(chunk), width), IGNORE_INDEX, dtype=torch.long)
            for row, (i, l) in enumerate(chunk):
                ids[row, :len(i)], labels[row, :len(l)] = torch.from_numpy(i), torch.from_numpy(l)
            mask = torch.arange(width) < torch.tensor([len(i) for i, _ in chunk])[:, None]  # right padding
            logits = model(input_ids=ids.to(device), attention_mask=mask.long().to(device)).logits[:, :-1]
            target = labels[:, 1:].to(device)
            rows, cols = torch.nonzero(target != IGNORE_INDEX, as_tuple=True)  # scored tokens only
            nll = torch.nn.functional.cross_entropy(logits[rows, cols].float(), target[rows, cols], reduction="none")
            total = torch.zeros(len(chunk), dtype=torch.float64, device=device).index_add_(0, rows, nll.double())
            out[start:start + len(chunk)] = total.cpu().numpy() / math.log(2)
    return out


def canary_exposures(model, tokenizer, canaries: Sequence[Canary], *, references: int = 1000, seed: int = 0,
                     method: str = "interpolation", batch_size: int = 32) -> dict[int, list[float]]:
    """Exposure of each canary, keyed by repeat count (sorted; 0 = controls), against `references` candidates of
    the canaries' space that are none of the canaries, drawn with `seed` (the same seed, the same references: use
    one seed for the base and the tuned model). Interpolated exposure is at most log2(references)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    spaces = {c.space for c in canaries}
    if len(spaces) != 1:
        raise ValueError("canary_exposures needs canaries, all from one canary space")
    (space,) = spaces
    numbers = space.distinct(random.Random(seed), references, exclude=[c.number for c in canaries])
    reference = log_perplexities(model, tokenizer, [space.render(n) for n in numbers], batch_size=batch_size)
    scores = log_perplexities(model, tokenizer, [c.text for c in canaries], batch_size=batch_size)
    grouped: dict[int, list[float]] = {}
    for canary, score in zip(canaries, scores):
        grouped.setdefault(canary.repeats, []).append(float(score))
    exposures = METHODS[method](dict(sorted(grouped.items())), reference)
    return {repeats: [float(e) for e in values] for repeats, values in exposures.items()}


def longest_common_token_run(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest contiguous run of tokens that `a` and `b` share (longest common substring)."""
    best, previous = 0, [0] * (len(b) + 1)
    for x in a:
        current = [0] * (len(b) + 1)
        for j, y in enumerate(b, 1):
            if x == y:
                current[j] = previous[j - 1] + 1
                best = max(best, current[j])
        previous = current
    return best


def greedy_continuation(model, prompt: Sequence[int], length: int) -> list[int]:
    """The `length` tokens greedy decoding appends to `prompt` (argmax each step; end-of-sequence does not stop it)."""
    device = _device(model)
    tokens: list[int] = []
    with _EvalMode(model), torch.inference_mode():
        out = model(input_ids=torch.tensor([list(prompt)], device=device), use_cache=True)
        for _ in range(length):
            token = out.logits[0, -1].argmax()
            tokens.append(int(token))
            if len(tokens) < length:
                out = model(input_ids=token.view(1, 1), cache=out.cache, use_cache=True)
    return tokens


def extraction_rates(model, prompts_and_truths: Sequence[tuple[Sequence[int], Sequence[int]]], *,
                     prefix_tokens: int, suffix_tokens: int = 50) -> list[dict[str, int | bool]]:
    """Per example `(prompt ids, true continuation ids)`: greedy-generate `suffix_tokens` tokens after the last
    `prefix_tokens` tokens of the prompt (all of it if shorter) and compare with the first `suffix_tokens` of the
    truth: `{"longest_common_run": tokens, "exact": the whole suffix reproduced}`."""
    if prefix_tokens < 1 or suffix_tokens < 1:
        raise ValueError("prefix_tokens and suffix_tokens must be >= 1")
    results = []
    for index, (prompt, truth) in enumerate(prompts_and_truths):
        if not len(prompt) or len(truth) < suffix_tokens:
            raise ValueError(f"example {index}: needs a non-empty prompt and a true continuation of at least "
                             f"suffix_tokens={suffix_tokens} tokens (it has {len(truth)})")
        generated = greedy_continuation(model, list(prompt)[-prefix_tokens:], suffix_tokens)
        expected = [int(t) for t in truth[:suffix_tokens]]
        results.append({"longest_common_run": longest_common_token_run(generated, expected),
                        "exact": generated == expected})
    return results


def doctor_turn_examples(tokenizer, dialogues: Sequence[Sequence[dict]], *, suffix_tokens: int = 50,
                         max_length: int = 4096) -> list[tuple[list[int], list[int]]]:
    """`(prompt, truth)` token ids per dialogue, in the chat text training uses: the truth is the first
    `suffix_tokens` tokens of the dialogue's first doctor turn that has that many supervised tokens, the prompt
    everything before them. Dialogues without such a turn are skipped."""
    examples = []
    for ids, labels in encode_arrays(tokenizer, dialogues, max_length=max_length):
        supervised = np.concatenate([[False], labels != IGNORE_INDEX, [False]])
        edges = np.flatnonzero(np.diff(supervised.astype(np.int8)))
        for start, end in zip(edges[::2], edges[1::2]):
            if end - start >= suffix_tokens:
                examples.append((ids[:start].tolist(), ids[start:start + suffix_tokens].tolist()))
                break
    return examples

