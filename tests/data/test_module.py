"""DialogueDataModule: split, padding, packing that a Gemma 3 model cannot see across, resume, rank sharding."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from medtee.data import ChatTemplateError, DataError
from medtee.data.chat import IGNORE_INDEX, encode_dialogue
from medtee.data.module import DialogueDataModule
from medtee.data.synthetic import generate_dialogues
from medtee.data.tokenizer import build_demo_tokenizer

TOKENIZER = build_demo_tokenizer()


def _records(n, seed=0):
    records = generate_dialogues(n, seed=seed)
    for i, record in enumerate(records):  # make every dialogue unique, so batches can be compared row by row
        record["messages"].append({"role": "assistant", "content": f"Visit reference {i}."})
    return records


def _module(records, **overrides):
    settings = dict(max_length=256, batch_size=4, val_fraction=0.1, seed=0, packing=False)
    module = DialogueDataModule(records, TOKENIZER, **{**settings, **overrides})
    module.setup("fit")
    return module


def _rows(batches):
    """Every row of every batch as a tuple of its non-padding tokens."""
    rows = []
    for batch in batches:
        for r in range(batch["input_ids"].shape[0]):
            keep = batch["attention_mask"][r].bool() if "attention_mask" in batch else batch["input_ids"][r] != 0
            rows.append(tuple(batch["input_ids"][r][keep].tolist()))
    return rows


def test_split_is_deterministic_and_stats_are_counts():
    records = _records(60)
    module = _module(records, val_fraction=0.2)
    stats = module.stats()
    assert stats["n_train"] == 48 and stats["n_val"] == 12 and stats["n_records"] == 60 and stats["n_dropped"] == 0
    assert 0 < stats["supervised_tokens"] < stats["train_tokens"]
    assert all(isinstance(v, int) for v in stats.values())
    again = _module(records, val_fraction=0.2)
    assert _rows(again.val_dataloader()) == _rows(module.val_dataloader())
    other_seed = _module(records, val_fraction=0.2, seed=1)
    assert set(_rows(other_seed.val_dataloader())) != set(_rows(module.val_dataloader()))
    train, val = set(_rows(module.train_dataloader())), set(_rows(module.val_dataloader()))
    assert len(train) == 48 and len(val) == 12 and not train & val


def test_records_from_a_callable_and_dropped_dialogues():
    records = _records(10) + [{"id": "x", "messages": [{"role": "user", "content": "No doctor here."}]}]
    module = DialogueDataModule(lambda: iter(records), TOKENIZER, max_length=128, batch_size=2, val_fraction=0.0,
                                seed=0)
    module.setup("fit")
    assert module.stats()["n_train"] == 10 and module.stats()["n_dropped"] == 1
    assert module.stats()["n_truncated"] > 0  # demo dialogues are longer than 128 tokens
    assert module._records is None  # only the token arrays stay


def test_padded_batches():
    module = _module(_records(20))
    for batch in module.train_dataloader():
        assert set(batch) == {"input_ids", "labels", "attention_mask"}
        pad = batch["attention_mask"] == 0
        assert (batch["input_ids"][pad] == TOKENIZER.pad_token_id).all()
        assert (batch["labels"][pad] == IGNORE_INDEX).all()
        assert batch["input_ids"].shape[1] <= 256 and batch["input_ids"].dtype == torch.long


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="val_fraction"):
        DialogueDataModule([], TOKENIZER, max_length=64, batch_size=1, val_fraction=1.0, seed=0)
    with pytest.raises(ValueError, match="num_workers"):
        DialogueDataModule([], TOKENIZER, max_length=64, batch_size=1, val_fraction=0.1, seed=0, num_workers=2)
    with pytest.raises(DataError, match="no records"):
        DialogueDataModule([], TOKENIZER, max_length=64, batch_size=1, val_fraction=0.1, seed=0).setup("fit")


@pytest.mark.parametrize(("bad", "message"), [
    ({"id": "Secretname-MRN-1", "messages": [{"role": "doctor", "content": "Secretname"}]},
     r"record 700 \(counting from 0, in dataset order\), message 0: 'role' must be one of user \(the patient\), "
     r"assistant \(the doctor\), system; map the speakers"),
    ({"id": "Secretname-MRN-1", "messages": [{"role": "user", "content": "Hi"},
                                             {"role": "assistant", "content": "Secretname<end_of_turn>"}]},
     r"record 700 .*, message 1: the text contains the control token <end_of_turn>.*remove it from the data"),
    ({"id": "Secretname-MRN-1", "messages": [{"role": "user", "content": [{"type": "image", "image": "Secretname"}]},
                                             {"role": "assistant", "content": "Secretname"}]},
     r"record 700 .*, message 0: content part 0 is an 'image' part: medtee trains on text only"),
])
def test_bad_records_are_refused_by_position_before_any_batch(bad, message):
    records = _records(1000)
    records[700] = bad  # past the first tokenizer chunk
    module = DialogueDataModule(lambda: iter(records), TOKENIZER, max_length=64, batch_size=2, val_fraction=0.1,
                                seed=0)
    with pytest.raises(DataError, match=message) as err:
        module.setup("fit")
    assert "Secretname" not in str(err.value) and "MRN" not in str(err.value)
    with pytest.raises(RuntimeError, match="setup"):
        module.train_dataloader()


def test_a_dataset_without_a_doctor_turn_is_refused_and_one_record_without_is_dropped():
    patient_only = [{"id": f"p{i}", "messages": [{"role": "user", "content": "Only the patient."},
                                                 {"role": "assistant", "content": " "}]} for i in range(5)]
    with pytest.raises(DataError, match=r"none of the 5 records has a doctor turn with text: the doctor's messages "
                                        r"must have role 'assistant'"):
        _module(patient_only)
    assert _module(_records(9) + patient_only[:1], val_fraction=0.0).stats()["n_dropped"] == 1
    with pytest.raises(DataError, match=r"no training dialogue has a doctor turn left .*raise data.max_length"):
        _module([{"messages": [{"role": "user", "content": "A long story about my knee. " * 4},
                               {"role": "assistant", "content": "Okay."}]}] * 3, max_length=8, val_fraction=0.0)


def test_a_tokenizer_whose_chat_template_renders_differently_is_refused_when_the_module_is_built():
    tokenizer = build_demo_tokenizer()
    tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    with pytest.raises(ChatTemplateError, match=r"renders an ordinary dialogue differently"):
        DialogueDataModule(_records(4), tokenizer, max_length=64, batch_size=1, val_fraction=0.0, seed=0)


def _tiny_gemma3(attn_implementation):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=len(TOKENIZER), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=16, intermediate_size=128, sliding_window=16,
                              layer_types=["sliding_attention", "full_attention"], max_position_embeddings=1024,
                              pad_token_id=TOKENIZER.pad_token_id, attn_implementation=attn_implementation)
    model = Gemma3ForCausalLM(config).float().train()  # dropout is 0 in Gemma 3; train() as under Lightning
    model.config.use_cache = False  # required for packed batches (a KV cache turns the packed-sequence mask off)
    return model


def _token_losses(model, input_ids, labels, **inputs):
    logits = model(input_ids=input_ids, **inputs).logits.float()
    return torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:],
                                             ignore_index=IGNORE_INDEX, reduction="none")


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_packed_loss_equals_separate_losses(attn_implementation):
    """Two dialogues packed into one row give, token for token, the loss each gives alone."""
    model = _tiny_gemma3(attn_implementation)
    records = _records(2, seed=11)
    module = _module(records, max_length=1024, batch_size=1, val_fraction=0.0, packing=True)
    (batch,) = list(module.train_dataloader())
    assert set(batch) == {"input_ids", "labels", "position_ids"}
    width = batch["input_ids"].shape[1]
    starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist()
    assert len(starts) == 2 and starts[0] == 0 and width > 2 * 16  # two dialogues, longer than the sliding window
    with torch.no_grad():
        packed = _token_losses(model, batch["input_ids"], batch["labels"], position_ids=batch["position_ids"])[0]
        # the same row without restarting positions: one long causal sequence, attention crosses the boundary
        crossing = _token_losses(model, batch["input_ids"], batch["labels"])[0]
        supervised = batch["labels"][0, 1:] != IGNORE_INDEX
        assert not torch.allclose(packed[supervised], crossing[supervised], atol=1e-3)  # the check can fail
        for start, end in zip(starts, starts[1:] + [width]):
            ids, labels = batch["input_ids"][:, start:end], batch["labels"][:, start:end]
            alone = _token_losses(model, ids, labels)[0]
            torch.testing.assert_close(packed[start:end - 1], alone, rtol=1e-5, atol=1e-5)
        assert batch["labels"][0, starts[1]] == IGNORE_INDEX and packed[starts[1] - 1] == 0  # no loss across


def test_packing_covers_every_dialogue_once():
    records = _records(30)
    packed = _module(records, packing=True, val_fraction=0.0, max_length=512)
    segments = []
    for batch in packed.train_dataloader():
        assert batch["input_ids"].shape[1] <= 512
        for r in range(batch["input_ids"].shape[0]):
            positions = batch["position_ids"][r]
            starts = (positions == 0).nonzero().flatten().tolist() + [positions.shape[0]]
            for start, end in zip(starts, starts[1:]):
                if (batch["labels"][r, start:end] != IGNORE_INDEX).any():
                    segments.append(tuple(batch["input_ids"][r, start:end].tolist()))
    expected = {tuple(encode_dialogue(TOKENIZER, r["messages"], max_length=512)["input_ids"]) for r in records}
    assert len(segments) == 30 and set(segments) == expected
    assert packed.stats()["n_train"] == 30


@pytest.mark.parametrize("packing", [False, True])
def test_resume_serves_the_same_following_batches(packing):
    records = _records(40)
    first = _module(records, packing=packing, max_length=300, batch_size=3)
    loader = first.train_dataloader()
    per_epoch = len(loader)
    stream = iter(loader)
    for _ in range(per_epoch - 2):
        next(stream)
    state = first.state_dict()
    assert state["position"] == per_epoch - 2 and state["epoch"] == 0
    tail = _rows([next(stream), next(stream)])
    next_epoch = _rows(first.train_dataloader())
    assert first.state_dict()["epoch"] == 2

    second = DialogueDataModule(records, TOKENIZER, max_length=300, batch_size=3, val_fraction=0.1, seed=0,
                                packing=packing)
    second.load_state_dict(state)  # before setup, as Lightning does on restore
    second.setup("fit")
    loader = second.train_dataloader()
    assert _rows(loader) == tail
    assert _rows(loader) == next_epoch
    assert _rows(loader) != next_epoch  # each epoch has its own order


def test_resume_refuses_other_settings():
    records = _records(20)
    module = _module(records)
    assert module.state_dict() == {}
    next(iter(module.train_dataloader()))
    state = module.state_dict()
    other = _module(records, batch_size=2)
    other.train_dataloader()
    with pytest.raises(ValueError, match="batch_size"):
        other.load_state_dict(state)


def test_poisson_batches_are_drawn_anew_whatever_the_seed_and_validation_is_unchanged():
    records = _records(40)
    draws = [_module(records, poisson=True) for _ in range(2)]  # the same recipe seed twice
    epochs = [[_rows([b]) for b in module.train_dataloader()] for module in draws]
    assert epochs[0] != epochs[1]  # the sampler's generator is seeded from the OS
    assert len(epochs[0]) == len(draws[0].train_dataloader()) == 9  # Opacus's epoch: int(1 / q), q = 4 / 36
    shuffled = _module(records)
    assert _rows(draws[0].val_dataloader()) == _rows(shuffled.val_dataloader())
    assert draws[0].stats() == shuffled.stats()


def test_poisson_resume_keeps_the_epoch_position_and_refuses_the_other_sampling():
    records = _records(40)
    module = _module(records, poisson=True)
    stream = iter(module.train_dataloader())
    for _ in range(3):
        next(stream)
    state = module.state_dict()
    assert state["sampling"] == "poisson" and state["epoch"] == 0 and state["position"] == 3
    resumed = _module(records, poisson=True)
    assert resumed.resume_problem(state, world_size=1) is None
    resumed.load_state_dict(state)
    assert sum(1 for _ in resumed.train_dataloader()) == 9 - 3  # the rest of the epoch, freshly drawn
    assert "hardware.devices=1" in resumed.resume_problem(state, world_size=2)
    shuffled = _module(records)
    next(iter(shuffled.train_dataloader()))
    assert "drawn by poisson, this run's by shuffling" in shuffled.resume_problem(state, world_size=1)
    assert "drawn by shuffling, this run's by poisson" in resumed.resume_problem(shuffled.state_dict(),
                                                                                 world_size=1)
    assert "privacy.dp.enabled" in resumed.resume_problem(shuffled.state_dict(), world_size=1)


def test_poisson_sampling_refuses_packing():
    with pytest.raises(ValueError, match="packing=False"):
        DialogueDataModule(_records(4), TOKENIZER, max_length=64, batch_size=1, val_fraction=0.0, seed=0,
                           packing=True, poisson=True)


def test_ranks_get_disjoint_shares_covering_the_set():
    records = _records(41)  # 37 training dialogues: one sits each epoch out, so that shares stay equal
    whole = _rows(_module(records).train_dataloader())
    shares = []
    for rank in (0, 1):
        module = _module(records)
        module.trainer = SimpleNamespace(global_rank=rank, world_size=2)
        shares.append(_rows(module.train_dataloader()))
    assert len(shares[0]) == len(shares[1]) == 18
    assert not set(shares[0]) & set(shares[1])
    assert set(shares[0]) | set(shares[1]) <= set(whole) and len(set(shares[0]) | set(shares[1])) == 36


def test_lightning_checkpoint_resumes_mid_epoch(tmp_path):
    """Through a real Trainer: a run resumed from a mid-epoch checkpoint sees exactly the batches it had left."""
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint

    class Recorder(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(()))
            self.seen = []

        def training_step(self, batch, batch_idx):
            self.seen.append(_rows([batch]))
            return (self.weight - batch["input_ids"].float().mean()) ** 2

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    def fit(max_steps, ckpt_path=None, callbacks=()):
        module = Recorder()
        trainer = pl.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=False,
                             enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                             num_sanity_val_steps=0, callbacks=list(callbacks), default_root_dir=tmp_path,
                             enable_checkpointing=bool(callbacks))
        trainer.fit(module, datamodule=_module(_records(24), batch_size=4), ckpt_path=ckpt_path)
        return module.seen

    every = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1,
                            filename="{step}")
    straight = fit(9, callbacks=[every])  # 5 batches per epoch: step 3 is mid-epoch, step 9 is in the second
    resumed = fit(9, ckpt_path=tmp_path / "ckpt" / "step=3.ckpt")
    assert len(straight) == 9 and resumed == straight[3:]
    assert straight[5:9] != straight[0:4]  # the second epoch has its own order


def test_errors_and_reprs_carry_no_record_text():
    from medtee.data.module import tokenize_records

    with pytest.raises(DataError, match=r"record 0 \(counting from 0, in dataset order\): expected a chat record"):
        tokenize_records([{"id": "r1", "text": "Secretname"}], TOKENIZER, max_length=64)
    with pytest.raises(DataError, match=r"record 0 .*: expected a chat record"):
        tokenize_records(["Secretname"], TOKENIZER, max_length=64)
    data = tokenize_records(_records(3), TOKENIZER, max_length=64)
    assert repr(data) == "TokenizedRecords(examples=3, tokens=192)"
    module = _module(_records(10))
    assert "Visit" not in repr(module) and "Visit" not in repr(module.train_dataloader())


def test_pack_fills_rows_without_overflow():
    import numpy as np

    from medtee.data.module import pack

    lengths = np.random.default_rng(0).integers(20, 1500, size=500)
    rows = pack(lengths, 2048, seed=0)
    assert sorted(np.concatenate(rows).tolist()) == list(range(500))
    assert all(lengths[row].sum() <= 2048 for row in rows)
    assert lengths.sum() / (len(rows) * 2048) > 0.95  # best-fit decreasing; arrival order gives about 0.8
    assert [r.tolist() for r in pack(lengths, 2048, seed=0)] == [r.tolist() for r in rows]
