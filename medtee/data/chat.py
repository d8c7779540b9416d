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


def encode_dialogues(tokenizer, dialogues: Sequence[Sequence[dict]], *, max_length: int,
                     names: Sequence[str] | None = None) -> list[dict]:
    """`encode_dialogue` for many dialogues at once (one batched tokenizer call); same results, in order.

    `names` (e.g. record ids) label the dialogues in error messages; by default their positions do.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    control = re.compile("|".join(map(re.escape, sorted({*TURN_MARKERS, *tokenizer.all_special_tokens}))))
    turns = []
    for number, messages in enumerate(dialogues):
        name = names[number] if names is not None else f"dialogue {number}"
        try:
            turns.append(to_gemma_turns(messages))
        except ValueError as error:
            raise ValueError(f"{name}, {error}") from None
        for index, turn in enumerate(turns[-1]):
            if found := control.search(turn["content"]):
                raise ValueError(f"{name}, turn {index}: the text contains the control token {found.group()}, "
                                 "which would be read as chat structure (e.g. a forged turn boundary); remove it "
                                 "from the data before sealing")
    present = [dialogue for dialogue in turns if dialogue]
    encoded = iter(())
    if present:
        out = tokenizer.apply_chat_template(
            present, chat_template=GEMMA3_TRAINING_TEMPLATE, tokenize=True, return_dict=True,
            return_assistant_tokens_mask=True, truncation=True, max_length=max_length,
        )
        encoded = zip(out["input_ids"], out["assistant_masks"])
    results = []
    for dialogue in turns:
        if not dialogue:
            results.append({"input_ids": [], "labels": []})
            continue
        ids, mask = next(encoded)
        results.append({"input_ids": list(ids),
                        "labels": [token if keep else IGNORE_INDEX for token, keep in zip(ids, mask)]})
    return results


def encode_dialogue(tokenizer, messages: Sequence[dict], *, max_length: int) -> dict:
    """{"input_ids", "labels"} of one dialogue; labels are -100 except on doctor content and its <end_of_turn>.

    Works with the demo tokenizer and with a real Gemma 3 tokenizer (both render `GEMMA3_TRAINING_TEMPLATE`).
    A dialogue with no doctor turn encodes to empty lists.
    """
    return encode_dialogues(tokenizer, [messages], max_length=max_length)[0]
