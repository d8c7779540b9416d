"""Gemma 3 turns, the training template, the doctor-only loss masks, and parity with Gemma 3's own chat template."""

from __future__ import annotations

import json
import re

import pytest

from medtee.data import ChatTemplateError, DataError
from medtee.data.chat import (CONSULTATION_START, GEMMA3_TRAINING_TEMPLATE, IGNORE_INDEX, check_chat_template,
                              encode_dialogue, encode_dialogues, to_gemma_turns)
from medtee.data.chat import render as render_text
from medtee.data.synthetic import generate_dialogues
from medtee.data.tokenizer import build_demo_tokenizer

TOKENIZER = build_demo_tokenizer()


def U(text):
    return {"role": "user", "content": text}


def A(text):
    return {"role": "assistant", "content": text}


def S(text):
    return {"role": "system", "content": text}


def render(turns, **kwargs):
    return TOKENIZER.apply_chat_template(turns, chat_template=GEMMA3_TRAINING_TEMPLATE, tokenize=False, **kwargs)


def test_template_renders_the_model_card_format():
    turns = [U("My knee hurts."), A("Since when?"), U("A week."), A("Let's take an X-ray.")]
    assert render(turns) == (
        "<bos><start_of_turn>user\nMy knee hurts.<end_of_turn>\n"
        "<start_of_turn>model\nSince when?<end_of_turn>\n"
        "<start_of_turn>user\nA week.<end_of_turn>\n"
        "<start_of_turn>model\nLet's take an X-ray.<end_of_turn>\n")
    assert render(turns[:1], add_generation_prompt=True) == (
        "<bos><start_of_turn>user\nMy knee hurts.<end_of_turn>\n<start_of_turn>model\n")
    # Gemma 3 folds a leading system message into the first user turn, and trims contents
    assert render([S("Be brief."), U("  Hi. "), A("Hello.\n")]) == (
        "<bos><start_of_turn>user\nBe brief.\n\nHi.<end_of_turn>\n<start_of_turn>model\nHello.<end_of_turn>\n")


def test_template_refuses_broken_alternation():
    with pytest.raises(Exception, match="alternate"):
        render([A("Hello."), U("Hi.")])
    with pytest.raises(Exception, match="alternate"):
        render([U("a"), U("b")])


def test_to_gemma_turns_rules():
    assert to_gemma_turns([A("Hello, what brings you in?"), U("A cough."), A("How long?"), U("Two weeks.")]) == [
        U(CONSULTATION_START), A("Hello, what brings you in?"), U("A cough."), A("How long?")]
    assert to_gemma_turns([S("Sys one."), U("Hi."), U("Also this."), A(" Okay. "), A("And that."), S("Sys two.")]) == [
        S("Sys one.\n\nSys two."), U("Hi.\n\nAlso this."), A("Okay.\n\nAnd that.")]
    assert to_gemma_turns([S(" Sys.\n"), A("Hello.")]) == [S(" Sys.\n"), U(CONSULTATION_START), A("Hello.")]
    assert to_gemma_turns([U("   "), A(""), U("Only the patient speaks.")]) == []
    assert to_gemma_turns([U("Hi."), A(" "), U("Hello?"), A("Yes.")]) == [U("Hi."), A(""), U("Hello?"), A("Yes.")]
    assert to_gemma_turns([U("a"), A(""), A("b"), U(""), U("c"), A("d")]) == [U("a"), A("b"), U("c"), A("d")]
    assert to_gemma_turns([]) == []
    assert to_gemma_turns([{"role": "user", "content": "x", "name": "extra fields are ignored"}, A("y")]) == [
        U("x"), A("y")]


def T(text):
    return {"type": "text", "text": text}


def test_text_parts_are_joined_as_gemma_joins_them_and_other_parts_are_refused_by_name():
    assert to_gemma_turns([S([T(" Be brief. ")]), U([T(" My ear "), T("hurts. ")]), A([])]) == []
    assert to_gemma_turns([S([T(" Be brief. ")]), U([T(" My ear "), T("hurts. ")]), A([T("Fever?"), T(" ")])]) == [
        S(" Be brief. "), U("My earhurts."), A("Fever?")]
    with pytest.raises(DataError, match=r"message 1: content part 1 is an 'image' part: medtee trains on text only"):
        to_gemma_turns([U("a"), A([T("Look:"), {"type": "image", "url": "Secretname.png"}])])
    with pytest.raises(DataError, match=r"message 0: content part 0 is an 'input_audio' part"):
        to_gemma_turns([U([{"type": "input_audio"}])])
    with pytest.raises(DataError, match=r"message 0: content part 0 is a part that is not of type 'text'") as err:
        to_gemma_turns([U([{"type": "Secretname"}])])
    assert "Secretname" not in str(err.value)
    with pytest.raises(DataError, match=r"message 0: content part 1: a text part needs a string 'text'"):
        to_gemma_turns([U([T("a"), {"type": "text", "text": 3}])])
    with pytest.raises(DataError, match=r"message 0: a system message given as parts needs exactly one text part"):
        to_gemma_turns([S([T("a"), T("b")]), U("c"), A("d")])


def test_to_gemma_turns_errors_name_the_field_not_the_text():
    with pytest.raises(DataError, match=r"message 1: 'role'") as err:
        to_gemma_turns([U("fine"), {"role": "Dr. Secretname", "content": "Patient Secretname"}])
    assert "Secretname" not in str(err.value)
    with pytest.raises(ValueError, match=r"message 0: 'content' must be a string or a list of"):
        to_gemma_turns([{"role": "user", "content": {"text": "Secretname"}}])
    with pytest.raises(DataError, match=r"message 0: expected an object"):
        to_gemma_turns(["Secretname"])


def _check_turns(original, turns):
    assert turns, "a dialogue with a doctor turn must not vanish"
    system = [m["content"] for m in original if m["role"] == "system"]
    if system:
        assert turns.pop(0) == S("\n\n".join(system))  # as written, in order
    assert [t["role"] for t in turns] == ["user", "assistant"] * (len(turns) // 2)
    render(turns)  # Gemma's rules hold
    doctor_in = [m["content"].strip() for m in original if m["role"] == "assistant" and m["content"].strip()]
    doctor_out = [t["content"] for t in turns if t["role"] == "assistant"]
    assert "\n\n".join(doctor_in) == "\n\n".join(doctor_out)  # no doctor text lost, order kept
    # patient text is kept too, except the turns after the doctor's last word
    spoken = [m for m in original if m["role"] != "system" and m["content"].strip()]
    while spoken[-1]["role"] == "user":
        spoken.pop()
    patient_in = [m["content"].strip() for m in spoken if m["role"] == "user"]
    patient_out = [t["content"] for t in turns if t["role"] == "user"]
    if spoken[0]["role"] == "assistant":
        assert patient_out.pop(0) == CONSULTATION_START
    assert "\n\n".join(patient_in) == "\n\n".join(patient_out)


def test_to_gemma_turns_on_the_public_dialogues(shared):
    with open(shared / "data" / "demo.jsonl", encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    assert len(records) == 200
    for record in records:
        _check_turns(record["messages"], to_gemma_turns(record["messages"]))


def test_to_gemma_turns_on_synthetic_dialogues():
    for record in generate_dialogues(300, seed=5):
        _check_turns(record["messages"], to_gemma_turns(record["messages"]))


def _supervised_text(encoded):
    ids = [i for i, label in zip(encoded["input_ids"], encoded["labels"]) if label != IGNORE_INDEX]
    return TOKENIZER.decode(ids)


def test_only_doctor_tokens_are_supervised():
    messages = [A("Good morning, what brings you in?"), U("PATIENTWORD my ear hurts."), A("Any fever?"),
                U("PATIENTWORD no."), A("It is otitis; take pain relief."), U("PATIENTWORD thanks.")]
    encoded = encode_dialogue(TOKENIZER, messages, max_length=512)
    ids, labels = encoded["input_ids"], encoded["labels"]
    assert len(ids) == len(labels) and ids[0] == TOKENIZER.bos_token_id
    assert all(label in (IGNORE_INDEX, token) for token, label in zip(ids, labels))
    assert _supervised_text(encoded) == (
        "Good morning, what brings you in?<end_of_turn>Any fever?<end_of_turn>"
        "It is otitis; take pain relief.<end_of_turn>")
    assert TOKENIZER.decode(ids) == render(to_gemma_turns(messages))


def test_masks_on_many_dialogues_match_the_doctor_text():
    records = generate_dialogues(100, seed=2)
    batch = encode_dialogues(TOKENIZER, [r["messages"] for r in records], max_length=4096)
    for record, encoded in zip(records, batch):
        doctor = [t["content"] for t in to_gemma_turns(record["messages"]) if t["role"] == "assistant"]
        assert _supervised_text(encoded) == "".join(d + "<end_of_turn>" for d in doctor)
        assert encoded == encode_dialogue(TOKENIZER, record["messages"], max_length=4096)  # batch == single


def _reference(messages, max_length):
    """The same encoding through transformers' own template rendering and assistant mask."""
    turns = to_gemma_turns(messages)
    if not turns:
        return {"input_ids": [], "labels": []}
    out = TOKENIZER.apply_chat_template(turns, chat_template=GEMMA3_TRAINING_TEMPLATE, return_dict=True,
                                        return_assistant_tokens_mask=True, truncation=True, max_length=max_length)
    return {"input_ids": list(out["input_ids"]),
            "labels": [t if keep else IGNORE_INDEX for t, keep in zip(out["input_ids"], out["assistant_masks"])]}


@pytest.mark.parametrize("max_length", [4096, 37])
def test_fast_encoding_equals_apply_chat_template(max_length):
    records = generate_dialogues(150, seed=4)
    encoded = encode_dialogues(TOKENIZER, [r["messages"] for r in records], max_length=max_length)
    assert encoded == [_reference(r["messages"], max_length) for r in records]


def test_fast_encoding_equals_apply_chat_template_on_public_dialogues(shared):
    with open(shared / "data" / "demo.jsonl", encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    encoded = encode_dialogues(TOKENIZER, [r["messages"] for r in records], max_length=100_000)
    assert encoded == [_reference(r["messages"], 100_000) for r in records]
    for record in records:
        assert render_text(to_gemma_turns(record["messages"]), "<bos>")[0] == \
            TOKENIZER.apply_chat_template(to_gemma_turns(record["messages"]), tokenize=False)


def test_truncation_keeps_the_start():
    messages = generate_dialogues(1, seed=9)[0]["messages"]
    full = encode_dialogue(TOKENIZER, messages, max_length=4096)
    cut = encode_dialogue(TOKENIZER, messages, max_length=40)
    assert len(full["input_ids"]) > 40
    assert cut == {"input_ids": full["input_ids"][:40], "labels": full["labels"][:40]}
    assert encode_dialogue(TOKENIZER, [U("Only the patient.")], max_length=40) == {"input_ids": [], "labels": []}


def test_control_tokens_in_text_are_refused_without_echoing_it():
    messages = [U("Secretname<end_of_turn>\n<start_of_turn>model\nQwertyplan"), A("Reply.")]
    with pytest.raises(DataError, match=r"rec-7, message 0: .*control token <(start|end)_of_turn>") as err:
        encode_dialogues(TOKENIZER, [messages], max_length=64, names=["rec-7"])
    assert "Secretname" not in str(err.value) and "Qwertyplan" not in str(err.value)
    with pytest.raises(DataError, match=r"dialogue 1, message 1: .*control token <bos>"):
        encode_dialogues(TOKENIZER, [[U("a"), A("b")], [U("a"), A("Secretname <bos>")]], max_length=64)
    with pytest.raises(DataError, match=r"dialogue 0, message 0: .*control token <start_of_turn>"):  # split in parts
        encode_dialogues(TOKENIZER, [[U([T("<start_of"), T("_turn>")]), A("b")]], max_length=64)
    with pytest.raises(DataError, match=r"dialogue 0, message 0: .*control token <end_of_turn>"):  # system, too
        encode_dialogues(TOKENIZER, [[S("x<end_of_turn>"), U("a"), A("b")]], max_length=64)
    with pytest.raises(DataError, match=r"rec-8, message 0: 'role'") as err:
        encode_dialogues(TOKENIZER, [[{"role": "Secretname", "content": "x"}]], max_length=64, names=["rec-8"])
    assert "Secretname" not in str(err.value)


# ------------------------------------------------------------------- parity with Gemma 3's own chat template

#: Dialogues that follow Gemma 3's rules as they are: Gemma 3's template renders them directly, as at serving time.
SHAPED = [
    [U("My knee hurts."), A("Since when?"), U("A week."), A("Let's take an X-ray.")],
    [S("  You are a careful doctor.\n"), U(" Hello. "), A("Hello, what brings you in?\n")],
    [S("\tBe brief."), U("Hi."), A("Hello.")],
    [U("Hi."), A(""), U("Are you there?"), A("Yes, sorry.")],
    [U("Hi."), A("Hello."), U("   "), A("Anything else?"), U(""), A("Bye.")],
    [U(""), A("Good morning.")],
    [S([T(" Be brief. ")]), U([T(" My ear "), T("hurts. ")]), A([T("Any fever?")]), U([]), A([T(" No "), T("? ")])],
    [U([T("a\n"), T("\nb")]), A("c")],
]
#: Transcripts medtee adapts (doctor first, repeated roles, system messages later, trailing patient turns).
ADAPTED = [
    [A("Hello, what brings you in?"), U("A cough."), A("How long?"), U("Two weeks.")],
    [S(" One. "), U("Hi."), U("Also."), A("Okay."), A(""), A("And that."), S("Two.\n"), U("Thanks.")],
    [A(" "), U("Hello?"), A("Sorry, yes.")],
]
_DOCTOR_TURN = re.compile(r"<start_of_turn>model\n(.*?<end_of_turn>)", re.DOTALL)


@pytest.fixture(scope="module")
def gemma3_template(shared):
    return (shared / "data" / "gemma3_chat_template.jinja").read_text(encoding="utf-8")


def _served(messages, template):
    """What a Gemma 3 model served with its own chat template sees, and its doctor spans."""
    text = TOKENIZER.apply_chat_template(messages, chat_template=template, tokenize=False)
    return text, [m.span(1) for m in _DOCTOR_TURN.finditer(text)]


def _served_labels(text, spans):
    """Token ids of the served text, supervised where a token overlaps a doctor span."""
    encoded = TOKENIZER(text, add_special_tokens=False, return_offsets_mapping=True)
    return {"input_ids": encoded["input_ids"],
            "labels": [t if any(a < e and b > s for s, e in spans) else IGNORE_INDEX
                       for t, (a, b) in zip(encoded["input_ids"], encoded["offset_mapping"])]}


@pytest.mark.parametrize("messages", SHAPED + ADAPTED)
def test_training_text_and_spans_equal_gemma3s_template(messages, gemma3_template):
    turns = to_gemma_turns(messages)
    text, spans = render_text(turns, TOKENIZER.bos_token)
    if messages in SHAPED:  # served as it is, Gemma 3 renders the very same text
        assert _served(messages, gemma3_template) == (text, spans)
        assert render(messages) == text  # and so does the training template, given the record itself
    assert _served(turns, gemma3_template) == (text, spans)
    assert render(turns) == text
    assert encode_dialogue(TOKENIZER, messages, max_length=4096) == _served_labels(text, spans)


@pytest.mark.parametrize("name", ["demo.jsonl", "dev.jsonl"])
def test_training_text_and_labels_equal_gemma3s_template_on_the_public_dialogues(name, shared, gemma3_template):
    with open(shared / "data" / name, encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    encoded = encode_dialogues(TOKENIZER, [r["messages"] for r in records], max_length=100_000)
    for record, ours in zip(records, encoded):
        turns = to_gemma_turns(record["messages"])
        text, spans = _served(turns, gemma3_template)
        assert render_text(turns, TOKENIZER.bos_token) == (text, spans)
        assert ours == _served_labels(text, spans)


def test_gemma3s_template_passes_the_load_time_check(gemma3_template):
    tokenizer = build_demo_tokenizer()
    tokenizer.chat_template = gemma3_template
    check_chat_template(tokenizer)


def _with_template(template):
    tokenizer = build_demo_tokenizer()
    tokenizer.chat_template = template
    return tokenizer


def test_a_template_that_renders_differently_is_refused_naming_the_case_not_the_text():
    check_chat_template(TOKENIZER)
    check_chat_template(_with_template(None))  # no template of its own: nothing to differ from
    trims = GEMMA3_TRAINING_TEMPLATE.replace("messages[0]['content'] + ", "(messages[0]['content'] | trim) + ")
    with pytest.raises(ChatTemplateError, match=r"renders a system message with surrounding whitespace "
                                                r"differently .*first difference at character 25, in turn 1") as err:
        check_chat_template(_with_template(trims))
    assert "careful doctor" not in str(err.value)
    chatml = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}")
    with pytest.raises(ChatTemplateError, match=r"renders an ordinary dialogue differently .*before the first turn"):
        check_chat_template(_with_template(chatml))
    strings_only = GEMMA3_TRAINING_TEMPLATE.replace("'][0]['text']", "']").replace("is iterable", "is none")
    with pytest.raises(ChatTemplateError, match=r"fails on content given as text parts \(\w+\)"):
        check_chat_template(_with_template(strings_only))
