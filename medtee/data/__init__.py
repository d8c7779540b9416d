"""Chat records to training batches, in memory: synthetic demo data, demo tokenizer, Gemma 3 formatting, validation,
DataModule.

Submodules are imported where used; `medtee.data.module` pulls in torch and lightning. The errors below import
nothing, so `medtee.run` can catch them without loading the data code.
"""

#: The chat roles of a record's messages: `user` is the patient, `assistant` the doctor, `system` instructions.
ROLES = ("user", "assistant", "system")


class DataError(ValueError):
    """Records that cannot be trained on. The message names the record by its position (counting from 0, in dataset
    order), the message or part, and the fix; never the record's id (it may carry identifiers) or its text."""


class ChatTemplateError(DataError):
    """The model's own chat template renders a dialogue differently from medtee's training text."""
