"""The checks every decrypted record passes before any training work, in the one pass that tokenizes it, and the
dataset's after it.

A record must be a chat record (`{"messages": [{"role", "content"}, ...]}`, extra fields ignored) whose messages have
a known role, text content (a string or text parts) and no control token (`chat.to_gemma_turns`). A record without a
doctor turn is kept as `[]`: the data module drops and counts it (`n_dropped`), since one patient-only fragment is no
reason to refuse a dataset. A dataset without any record, or without a single doctor turn (the doctor's role is not
`assistant`: a speaker-mapping mistake), is refused. Errors are `medtee.data.DataError`, naming the record by its
position, never its id or text.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from medtee.data import DataError
from medtee.data.chat import control_tokens, to_gemma_turns


def record_turns(records: Iterable[dict], tokenizer) -> Iterator[list[dict]]:
    """The Gemma 3 turns of every record, in order (`[]` for one without a doctor turn); DataError for the first
    record that cannot be trained on."""
    control = control_tokens(tokenizer)
    for position, record in enumerate(records):
        where = f"record {position} (counting from 0, in dataset order)"
        if not isinstance(record, dict) or not isinstance(record.get("messages"), (list, tuple)):
            raise DataError(f"{where}: expected a chat record {{'id', 'messages': [{{'role', 'content'}}, ...]}}; "
                            f"fix the record and seal the dataset again")
        try:
            yield to_gemma_turns(record["messages"], control)
        except DataError as error:
            raise DataError(f"{where}, {error}") from None


def check_dataset(records: int, with_doctor: int) -> None:
    """DataError for a dataset without records, or without a single record that has a doctor turn."""
    if not records:
        raise DataError("the dataset has no records; seal a dataset with at least one dialogue")
    if not with_doctor:
        raise DataError(f"none of the {records} records has a doctor turn with text: the doctor's messages must have "
                        f"role 'assistant' (the patient's 'user'); map the speakers and seal the dataset again")
