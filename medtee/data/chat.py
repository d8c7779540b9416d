"""Gemma 3 chat formatting with doctor-only loss masks.

`to_gemma_turns` adapts a transcript to Gemma 3's rules (first turn user, strict alternation, no system role):
- every content is stripped (Gemma's template trims it too) and empty turns are dropped;
- system messages are joined with a blank line and put before the first user turn (what Gemma's own template
  does with a leading system message);
- consecutive turns of the same role are merged into one, joined with a blank line;
- a dialogue that opens with the doctor gets a fixed first user turn, `CONSULTATION_START`, so the doctor's opening
  is kept and supervised (dropping it would lose doctor text; folding it into a user turn would hide it from the loss);
- patient turns after the doctor's last turn are dropped: nothing follows them to learn from;
- a dialogue without any doctor turn becomes `[]`: it has nothing to supervise.

`encode_dialogue` renders with `GEMMA3_TRAINING_TEMPLATE` (Gemma 3's format, model turns inside `{% generation %}`)
and labels only the doctor's content tokens and their `<end_of_turn>`. Dialogues longer than `max_length` are cut at
the end; one left with no supervised token is returned with all labels -100 and the data module drops it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

IGNORE_INDEX = -100  # label of tokens that carry no loss (torch's cross-entropy default ignore_index)
CONSULTATION_START = "(The consultation begins.)"  # first user turn of a dialogue that opens with the doctor
TURN_MARKERS = ("<start_of_turn>", "<end_of_turn>")  # control tokens refused in text, with the tokenizer's specials

# Gemma 3's chat format (model card: `<bos><start_of_turn>user\n...<end_of_turn>\n<start_of_turn>model\n...`), with
# the model's content and its <end_of_turn> inside {% generation %} so transformers can return the assistant mask.
GEMMA3_TRAINING_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{ '<start_of_turn>model\\n' }}"
    "{%- generation -%}{{ message['content'] | trim }}{{ '<end_of_turn>' }}{%- endgeneration -%}"
    "{{ '\\n' }}"
    "{%- else -%}"
    "{{ '<start_of_turn>' + message['role'] + '\\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)

_ROLES = frozenset({"user", "assistant", "system"})


def to_gemma_turns(messages: Sequence[dict]) -> list[dict]:
    """Alternating user/assistant turns that start with user and end with assistant (see the module docstring)."""
    system: list[str] = []
    turns: list[dict] = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"message {index}: expected an object with 'role' and 'content'")
        role, content = message.get("role"), message.get("content")
        if role not in _ROLES:
            raise ValueError(f"message {index}: 'role' must be one of user, assistant, system")
        if not isinstance(content, str):
            raise ValueError(f"message {index}: 'content' must be a string")
        content = content.strip()
        if not content:
            continue
        if role == "system":
            system.append(content)
        elif turns and turns[-1]["role"] == role:
            turns[-1]["content"] += "\n\n" + content
        else:
            turns.append({"role": role, "content": content})
    while turns and turns[-1]["role"] == "user":
        turns.pop()
    if not turns:
        return []
    if turns[0]["role"] == "assistant":
        turns.insert(0, {"role": "user", "content": CONSULTATION_START})
    if system:
        turns[0]["content"] = "\n\n".join(system) + "\n\n" + turns[0]["content"]
    return turns


def render(turns: Sequence[dict], bos_token: str) -> tuple[str, list[tuple[int, int]]]:
    """The text `GEMMA3_TRAINING_TEMPLATE` renders for `to_gemma_turns` output, and the character spans of the
    {% generation %} blocks (each model turn's content and its <end_of_turn>).

    The same string as the template, built without Jinja (tests compare the two on every dialogue they have).
    """
    parts, spans, position = [bos_token], [], len(bos_token)
    for turn in turns:
        head = "<start_of_turn>model\n" if turn["role"] == "assistant" else "<start_of_turn>user\n"
        piece = f"{head}{turn['content']}<end_of_turn>\n"
        if turn["role"] == "assistant":
            spans.append((position + len(head), position + len(piece) - 1))
        parts.append(piece)
        position += len(piece)
    return "".join(parts), spans


def encode_arrays(tokenizer, dialogues: Sequence[Sequence[dict]], *, max_length: int,
                  names: Sequence[str] | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """(input_ids, labels) int32 arrays per dialogue: one batched call of the fast tokenizer, masks in numpy.

    A token is supervised when it overlaps a {% generation %} span (what `apply_chat_template(...,
    return_assistant_tokens_mask=True)` does). `names` (e.g. record ids) label the dialogues in error messages.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    control = re.compile("|".join(map(re.escape, sorted({*TURN_MARKERS, *tokenizer.all_special_tokens}))))
    texts, all_spans = [], []
    for number, messages in enumerate(dialogues):
        name = names[number] if names is not None else f"dialogue {number}"
        try:
            turns = to_gemma_turns(messages)
        except ValueError as error:
            raise ValueError(f"{name}, {error}") from None
        for index, turn in enumerate(turns):
            if found := control.search(turn["content"]):
                raise ValueError(f"{name}, turn {index}: the text contains the control token {found.group()}, "
                                 "which would be read as chat structure (e.g. a forged turn boundary); remove it "
                                 "from the data before sealing")
        text, spans = render(turns, tokenizer.bos_token) if turns else ("", [])
        texts.append(text)
        all_spans.append(spans)
    encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True, return_attention_mask=False)
    results = []
    for ids, offsets, spans in zip(encoded["input_ids"], encoded["offset_mapping"], all_spans):
        ids = np.asarray(ids[:max_length], np.int32)
        if not spans:
            results.append((ids, np.full(len(ids), IGNORE_INDEX, np.int32)))
            continue
        offsets = np.asarray(offsets[:max_length], np.int64).reshape(-1, 2)
        span_starts, span_ends = np.asarray(spans, np.int64).T
        # the first span ending after each token's start; the token is inside if it ends after that span starts
        k = np.searchsorted(span_ends, offsets[:, 0], side="right")
        inside = (k < len(spans)) & (offsets[:, 1] > span_starts[np.minimum(k, len(spans) - 1)])
        results.append((ids, np.where(inside, ids, IGNORE_INDEX).astype(np.int32)))
    return results


def encode_dialogues(tokenizer, dialogues: Sequence[Sequence[dict]], *, max_length: int,
                     names: Sequence[str] | None = None) -> list[dict]:
    """`encode_dialogue` for many dialogues at once (one batched tokenizer call); same results, in order."""
    return [{"input_ids": ids.tolist(), "labels": labels.tolist()}
            for ids, labels in encode_arrays(tokenizer, dialogues, max_length=max_length, names=names)]


def encode_dialogue(tokenizer, messages: Sequence[dict], *, max_length: int) -> dict:
    """{"input_ids", "labels"} of one dialogue; labels are -100 except on doctor content and its <end_of_turn>.

    Works with any fast (`tokenizers`-backed) tokenizer that has Gemma 3's special tokens: the demo tokenizer and a
    real Gemma 3 tokenizer. A dialogue with no doctor turn encodes to empty lists.
    """
    return encode_dialogues(tokenizer, [messages], max_length=max_length)[0]
