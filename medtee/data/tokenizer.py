"""An offline demo tokenizer: byte-level BPE trained in memory on synthetic dialogues only.

It stands in for the Gemma 3 tokenizer where no model can be downloaded (tests, the CPU demo). It is trained on
`generate_dialogues` text and never on sealed data: a vocabulary learnt from patient text would carry that text out
in the tokenizer files. Byte-level BPE encodes any input, so real dialogues still round-trip through it.
"""

from __future__ import annotations

from functools import lru_cache

from medtee.data.chat import GEMMA3_TRAINING_TEMPLATE
from medtee.data.synthetic import generate_dialogues

# Gemma's ids for the first four (pad 0, eos 1, bos 2, unk 3); the turn markers follow.
SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>")
_TRAINING_DIALOGUES = 300


DEMO = "demo"  # the name of the demo tokenizer wherever a tokenizer is named (`medtee seal --tokenizer demo`)


def load_tokenizer(name: str, *, revision: str | None = None, offline: bool = True):
    """The tokenizer `name` names: `demo`, or a Hugging Face tokenizer directory or id (a cached one only when
    `offline`), at `revision`. A fast tokenizer only; never code from its repository. ValueError says why not."""
    if name == DEMO:
        return build_demo_tokenizer()
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name, revision=revision, local_files_only=offline,
                                                  trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise ValueError(f"no tokenizer found{' locally' if offline else ''} ({type(exc).__name__}); name a "
                         f"directory holding tokenizer.json (e.g. from save_pretrained), an id already in the "
                         f"Hugging Face cache, or '{DEMO}'") from None
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("a fast (tokenizer.json) tokenizer is needed; this one is slow")
    return tokenizer


def build_demo_tokenizer(*, vocab_size: int = 1024, seed: int = 0):
    """A `transformers` fast tokenizer with Gemma 3's special tokens and chat template; same ids on every build."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=_train(vocab_size, seed),
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens=["<start_of_turn>", "<end_of_turn>"],
        chat_template=GEMMA3_TRAINING_TEMPLATE,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )


@lru_cache(maxsize=4)
def _trained_json(vocab_size: int, seed: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 256 + len(SPECIAL_TOKENS) + 1:
        raise ValueError(f"build_demo_tokenizer: vocab_size must be > {256 + len(SPECIAL_TOKENS)} "
                         f"(256 byte symbols + {len(SPECIAL_TOKENS)} special tokens), got {vocab_size}")
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = (m["content"] for d in generate_dialogues(_TRAINING_DIALOGUES, seed=seed) for m in d["messages"])
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer.to_str()


def _train(vocab_size: int, seed: int):
    from tokenizers import Tokenizer

    # Training takes a fraction of a second; the cache makes repeated builds (tests, several modules) free.
    return Tokenizer.from_str(_trained_json(vocab_size, seed))
