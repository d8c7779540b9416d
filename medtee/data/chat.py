"""Gemma 3 chat formatting with doctor-only loss masks; the text is byte-identical to Gemma 3's own chat template.

`to_gemma_turns` adapts a transcript to Gemma 3's rules (first turn user, strict alternation, a system message only
first) and changes nothing that Gemma 3's template would render for a dialogue that already follows them:
- `content` is a string or a list of `{"type": "text", "text": ...}` parts, joined as the template joins them (each
  part trimmed, nothing between them); any other part type (image, audio, ...) is refused;
- user and doctor contents are stripped (the template trims them); system messages are kept exactly as written (the
  template does not trim them) and joined with a blank line into one leading system message;
- consecutive turns of the same role are merged into one, their non-empty contents joined with a blank line; an empty
  turn between two others is kept, as the template renders it;
- a dialogue that opens with the doctor gets a fixed first user turn, `CONSULTATION_START`, so the doctor's opening
  is kept and supervised (dropping it would lose doctor text; folding it into a user turn would hide it from the loss);
- patient turns after the doctor's last turn are dropped: nothing follows them to learn from;
- a dialogue in which the doctor says nothing becomes `[]`: it has nothing to supervise.

`render` builds the text Gemma 3's template renders for those turns, and the spans of the doctor's turns (content and
`<end_of_turn>`); `encode_arrays` labels only the tokens in those spans. Dialogues longer than `max_length` are cut
at the end. `check_chat_template` compares `render` with a tokenizer's own chat template at load time.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from medtee.data import ROLES, ChatTemplateError, DataError

IGNORE_INDEX = -100  # label of tokens that carry no loss (torch's cross-entropy default ignore_index)
CONSULTATION_START = "(The consultation begins.)"  # first user turn of a dialogue that opens with the doctor
TURN_MARKERS = ("<start_of_turn>", "<end_of_turn>")  # control tokens refused in text, with the tokenizer's specials

# Gemma 3's own chat template (the `chat_template` of its instruction-tuned tokenizers), rendering the same text, with
# each model turn's content and its <end_of_turn> inside {% generation %} so transformers can return the assistant mask.
GEMMA3_TRAINING_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}"
    "{%- endif -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- macro content(message) -%}"
    "{%- if message['content'] is string -%}"
    "{{ message['content'] | trim }}"
    "{%- elif message['content'] is iterable -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ '<start_of_image>' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] | trim }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- else -%}"
    "{{ raise_exception('Invalid content type') }}"
    "{%- endif -%}"
    "{%- endmacro -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{ '<start_of_turn>model\\n' }}"
    "{%- generation -%}{{ content(message) }}{{ '<end_of_turn>' }}{%- endgeneration -%}"
    "{{ '\\n' }}"
    "{%- else -%}"
    "{{ '<start_of_turn>' + message['role'] + '\\n' + (first_user_prefix if loop.first else '') }}"
    "{{ content(message) }}{{ '<end_of_turn>\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)

# Part types of the Hugging Face / OpenAI message formats, named when refused; any other type is not repeated (it is
# data, and could be anything).
_NON_TEXT_PARTS = frozenset({"image", "image_url", "input_image", "audio", "input_audio", "video", "video_url", "file",
                             "input_file", "document", "tool_use", "tool_result", "refusal"})
_FIX = "fix the record and seal the dataset again"


def content_text(content, role: str) -> str:
    """The text Gemma 3's template renders for a message's `content`: a string, or text parts each trimmed and joined
    with nothing between them; user and doctor text stripped, system text as written (the template does not trim it;
    of a system message given as parts it renders only the first, so exactly one text part is accepted)."""
    if isinstance(content, str):
        return content if role == "system" else content.strip()
    if not isinstance(content, list):
        raise DataError(f"'content' must be a string or a list of {{'type': 'text', 'text': ...}} parts; {_FIX}")
    texts = []
    for index, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text":
            named = (f"an '{kind}' part" if isinstance(kind, str) and kind in _NON_TEXT_PARTS
                     else "a part that is not of type 'text'")
            raise DataError(f"content part {index} is {named}: medtee trains on text only; remove the non-text "
                            f"parts (or the record) and seal the dataset again")
        if not isinstance(part.get("text"), str):
            raise DataError(f"content part {index}: a text part needs a string 'text'; {_FIX}")
        texts.append(part["text"])
    if role != "system":
        return "".join(text.strip() for text in texts)
    if len(texts) != 1:
        raise DataError(f"a system message given as parts needs exactly one text part, not {len(texts)} (Gemma 3's "
                        f"template renders only the first); join them into one and seal the dataset again")
    return texts[0]


def message_text(message: object, index: int) -> tuple[str, str]:
    """(role, rendered text) of one chat message: the one check of a message's shape, role and content, for the
    sealer and the loader alike. DataError names the message by `index`, never its text."""
    if not isinstance(message, dict):
        raise DataError(f"message {index}: expected an object with 'role' and 'content'; {_FIX}")
    role = message.get("role")
    if role not in ROLES:
        raise DataError(f"message {index}: 'role' must be one of user (the patient), assistant (the doctor), "
                        f"system; map the speakers to these roles and seal the dataset again")
    try:
        return role, content_text(message.get("content"), role)
    except DataError as error:
        raise DataError(f"message {index}: {error}") from None


def to_gemma_turns(messages: Sequence[dict], control: re.Pattern | None = None) -> list[dict]:
    """Gemma 3 turns of a transcript: an optional leading system message, then user/assistant turns that alternate,
    start with user and end with assistant (see the module docstring). `control` (`control_tokens`) refuses text that
    holds a control token. Errors (DataError) name the message by index, never its text."""
    system: list[str] = []
    turns: list[dict] = []
    for index, message in enumerate(messages):
        role, text = message_text(message, index)
        if control is not None and (found := control.search(text)):
            raise DataError(f"message {index}: the text contains the control token {found.group()}, which would be "
                            f"read as chat structure (e.g. a forged turn boundary); remove it from the data and seal "
                            f"the dataset again")
        if role == "system":
            system.append(text)
        elif turns and turns[-1]["role"] == role:
            turns[-1]["content"] = "\n\n".join(filter(None, (turns[-1]["content"], text)))
        else:
            turns.append({"role": role, "content": text})
    while turns and turns[-1]["role"] == "user":
        turns.pop()
    if not any(turn["content"] for turn in turns if turn["role"] == "assistant"):
        return []
    if turns[0]["role"] == "assistant":
        turns.insert(0, {"role": "user", "content": CONSULTATION_START})
    return ([{"role": "system", "content": "\n\n".join(system)}] if system else []) + turns


def control_tokens(tokenizer) -> re.Pattern:
    """What text may not contain: the turn markers and the tokenizer's special tokens, longest first."""
    special = {token.content for token in tokenizer.added_tokens_decoder.values() if token.special}
    tokens = {*TURN_MARKERS, *tokenizer.all_special_tokens, *special} - {""}
    return re.compile("|".join(re.escape(token) for token in sorted(tokens, key=lambda t: (-len(t), t))))


def render(turns: Sequence[dict], bos_token: str) -> tuple[str, list[tuple[int, int]]]:
    """The text Gemma 3's chat template renders for `to_gemma_turns` output, and the character spans of the doctor's
    turns (content and <end_of_turn>: the {% generation %} blocks of `GEMMA3_TRAINING_TEMPLATE`).

    The same string as the template, built without Jinja (tests compare the two on every dialogue they have).
    """
    prefix = ""
    if turns and turns[0]["role"] == "system":
        prefix, turns = turns[0]["content"] + "\n\n", turns[1:]
    parts, spans, position = [bos_token], [], len(bos_token)
    for number, turn in enumerate(turns):
        head = "<start_of_turn>model\n" if turn["role"] == "assistant" else "<start_of_turn>user\n"
        head += prefix if number == 0 else ""
        piece = f"{head}{turn['content']}<end_of_turn>\n"
        if turn["role"] == "assistant":
            spans.append((position + len(head), position + len(piece) - 1))
        parts.append(piece)
        position += len(piece)
    return "".join(parts), spans


def encode_turns(tokenizer, dialogues: Sequence[Sequence[dict]], *,
                 max_length: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(input_ids, labels) int32 arrays per dialogue of `to_gemma_turns` output: one batched call of the fast
    tokenizer, masks in numpy. A token is supervised when it overlaps a doctor span (what `apply_chat_template(...,
    return_assistant_tokens_mask=True)` does with the {% generation %} blocks)."""
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    rendered = [render(turns, tokenizer.bos_token) if turns else ("", []) for turns in dialogues]
    encoded = tokenizer([text for text, _ in rendered], add_special_tokens=False, return_offsets_mapping=True,
                        return_attention_mask=False)
    results = []
    for ids, offsets, (_, spans) in zip(encoded["input_ids"], encoded["offset_mapping"], rendered):
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


def encode_arrays(tokenizer, dialogues: Sequence[Sequence[dict]], *, max_length: int,
                  names: Sequence[str] | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """`encode_turns` of transcripts (lists of messages), each checked by `to_gemma_turns` with the tokenizer's
    control tokens. `names` label the dialogues in error messages (default `dialogue <i>`)."""
    control = control_tokens(tokenizer)
    turns = []
    for number, messages in enumerate(dialogues):
        try:
            turns.append(to_gemma_turns(messages, control))
        except DataError as error:
            raise DataError(f"{names[number] if names is not None else f'dialogue {number}'}, {error}") from None
    return encode_turns(tokenizer, turns, max_length=max_length)


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


def _text(text: str) -> dict:
    return {"type": "text", "text": text}


# Synthetic dialogues that follow Gemma 3's rules as they are, one per case where a template could differ.
_PROBES = (
    ("an ordinary dialogue", [
        {"role": "user", "content": "My knee hurts."}, {"role": "assistant", "content": "Since when?"},
        {"role": "user", "content": "A week."}, {"role": "assistant", "content": "Let's take an X-ray."}]),
    ("a system message with surrounding whitespace", [
        {"role": "system", "content": "  You are a careful doctor.\n"}, {"role": "user", "content": " Hello. "},
        {"role": "assistant", "content": "Hello, what brings you in?\n"}]),
    ("an empty turn in the middle", [
        {"role": "user", "content": "Hi."}, {"role": "assistant", "content": ""},
        {"role": "user", "content": " "}, {"role": "assistant", "content": "Sorry, go on."}]),
    ("content given as text parts", [
        {"role": "system", "content": [_text(" Be brief. ")]},
        {"role": "user", "content": [_text(" My ear "), _text("hurts. ")]},
        {"role": "assistant", "content": [_text("Any fever?")]}]),
)


def check_chat_template(tokenizer) -> None:
    """Refuse (ChatTemplateError) a tokenizer whose own chat template renders any of `_PROBES` differently from
    `render`: the model would be served text it was not trained on. The error names the case and where the texts
    first differ, not the text. A tokenizer without a chat template passes."""
    if not tokenizer.chat_template:
        return
    for what, messages in _PROBES:
        expected = render(to_gemma_turns(messages), tokenizer.bos_token)[0]
        try:
            served = tokenizer.apply_chat_template(messages, tokenize=False)
        except Exception as error:  # a template error's message quotes the template, not data; name the type only
            raise ChatTemplateError(f"the model's chat template fails on {what} ({type(error).__name__}); medtee "
                                    f"trains on Gemma 3's chat format: use a Gemma 3 tokenizer") from None
        if served != expected:
            at = next((i for i, (a, b) in enumerate(zip(served, expected)) if a != b), min(len(served), len(expected)))
            turn = expected[:at].count("<start_of_turn>")
            raise ChatTemplateError(
                f"the model's chat template renders {what} differently from medtee's training text (first difference "
                f"at character {at}, {f'in turn {turn}' if turn else 'before the first turn'}; the template's text has "
                f"{len(served)} characters, medtee's {len(expected)}): the model would be served text it was not "
                f"trained on; medtee trains on Gemma 3's chat format (docs/data.md): use a Gemma 3 tokenizer")
