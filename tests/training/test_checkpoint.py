"""Encrypted checkpoints through Lightning's CheckpointIO: round trip, tampering and another dataset's key refused
as CheckpointError naming the file, format-1 checkpoints written before still resume, atomic writes. The cipher and
its formats are tested in tests/crypto/test_stream.py."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from medtee.crypto.stream import MAGIC, derive_key
from medtee.training import checkpoint as ckpt

KEY = derive_key(b"\x01" * 32, "a" * 64)
GOLDEN_V1 = Path(__file__).parents[1] / "crypto" / "golden" / "step-0000007-v1.ckpt.enc"


def _state():
    return {"state_dict": {"lora_A": torch.arange(40_000, dtype=torch.float32)}, "global_step": 7,
            "medtee": {"run_info": {"mlflow_run_id": "abc"}, "rng": {"torch": torch.get_rng_state()}}}


def test_round_trip_over_several_chunks_and_nothing_plaintext_on_disk(tmp_path):
    io = ckpt.EncryptedCheckpointIO(KEY)
    path = tmp_path / "c" / "step-0000007.ckpt.enc"
    state = _state()
    io.save_checkpoint(state, path)
    raw = path.read_bytes()
    assert raw.startswith(MAGIC) and len(raw) > 160_000  # format 2, about ten 16 KiB chunks
    assert b"mlflow_run_id" not in raw and b"global_step" not in raw
    assert os.listdir(path.parent) == [path.name]  # no temporary file left behind
    back = io.load_checkpoint(path)
    assert back["global_step"] == 7 and back["medtee"]["run_info"] == {"mlflow_run_id": "abc"}
    assert torch.equal(back["state_dict"]["lora_A"], state["state_dict"]["lora_A"])
    io.remove_checkpoint(path)
    assert not path.exists()


def test_a_format_1_checkpoint_written_before_still_loads(tmp_path):
    path = tmp_path / "step-0000007.ckpt.enc"
    shutil.copyfile(GOLDEN_V1, path)
    back = ckpt.EncryptedCheckpointIO(KEY).load_checkpoint(path)
    assert back["global_step"] == 7 and back["medtee"]["run_info"] == {"mlflow_run_id": "abc"}
    assert torch.equal(back["state_dict"]["lora_A"], torch.arange(2000, dtype=torch.float32))


@pytest.mark.parametrize("fmt", ["v1", "v2"])
def test_tampering_is_detected(tmp_path, fmt):
    io = ckpt.EncryptedCheckpointIO(KEY)
    path = tmp_path / "x.ckpt.enc"
    if fmt == "v1":
        shutil.copyfile(GOLDEN_V1, path)
    else:
        io.save_checkpoint(_state(), path)
    blob = path.read_bytes()
    path.write_bytes(blob[:len(blob) // 2] + bytes([blob[len(blob) // 2] ^ 1]) + blob[len(blob) // 2 + 1:])
    with pytest.raises(ckpt.CheckpointError, match="x.ckpt.enc cannot be decrypted"):
        io.load_checkpoint(path)


def test_another_dataset_key_cannot_open_it_and_the_error_names_the_file_only(tmp_path):
    path = tmp_path / "y.ckpt.enc"
    ckpt.EncryptedCheckpointIO(KEY).save_checkpoint(_state(), path)
    other = derive_key(b"\x01" * 32, "b" * 64)  # same data key, another sealed dataset
    assert other != KEY and len(other) == 32
    with pytest.raises(ckpt.CheckpointError) as err:
        ckpt.EncryptedCheckpointIO(other).load_checkpoint(path)
    assert str(path) in str(err.value) and "another sealed dataset" in str(err.value)


def test_not_a_checkpoint_and_missing_file(tmp_path):
    (tmp_path / "plain.ckpt").write_bytes(b"PK\x03\x04 a zip")
    io = ckpt.EncryptedCheckpointIO(KEY)
    with pytest.raises(ckpt.CheckpointError, match="not a medtee encrypted checkpoint"):
        io.load_checkpoint(tmp_path / "plain.ckpt")
    with pytest.raises(ckpt.CheckpointError, match="no such checkpoint file"):
        io.load_checkpoint(tmp_path / "missing.ckpt.enc")


def _module(run_info=None):
    from medtee import config
    from medtee.training.model import build_model
    from medtee.training.module import CausalLMModule

    cfg = config.compose(["recipe=demo", "qlora=unquantized"])
    return CausalLMModule(build_model(cfg.model, cfg.qlora, vocab_size=64, device="cpu"), cfg.trainer,
                          run_info=run_info)


def test_a_checkpoint_that_does_not_open_or_fit_is_refused_naming_why(tmp_path):
    from medtee.data.module import DialogueDataModule
    from medtee.data.synthetic import generate_dialogues
    from medtee.data.tokenizer import build_demo_tokenizer

    module = _module()
    data = DialogueDataModule(generate_dialogues(12, seed=1), build_demo_tokenizer(), max_length=64, batch_size=2,
                              val_fraction=0.0, seed=0, packing=False)
    data.setup("fit")
    path = tmp_path / "z.ckpt.enc"
    saved = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(saved)
    position = data.train_dataloader().state_dict()
    written = {**_state(), "state_dict": saved["state_dict"], "DialogueDataModule": position}
    ckpt.EncryptedCheckpointIO(KEY).save_checkpoint(written, path)

    def info(key=KEY, world_size=1):
        return ckpt.resume_info(ckpt.EncryptedCheckpointIO(key), str(path), module, data, world_size=world_size)

    assert info() == {"mlflow_run_id": "abc"}
    with pytest.raises(ckpt.CheckpointError, match="z.ckpt.enc cannot be decrypted"):
        info(derive_key(b"\x02" * 32, "a" * 64))
    with pytest.raises(ckpt.CheckpointError, match="world_size differ from the checkpoint's"):
        info(world_size=2)  # written by one process, resumed by two
    ckpt.EncryptedCheckpointIO(KEY).save_checkpoint(_state(), path)  # an adapter of other modules
    with pytest.raises(ckpt.CheckpointError, match="adapter does not match this recipe's"):
        info()


def test_a_checkpoint_inspected_before_resuming_is_decrypted_once(tmp_path, monkeypatch):
    path = tmp_path / "c.ckpt.enc"
    io = ckpt.EncryptedCheckpointIO(KEY)
    io.save_checkpoint(_state(), path)
    calls, real = [], ckpt.decrypt
    monkeypatch.setattr(ckpt, "decrypt", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    inspected = io.inspect(path)
    assert io.load_checkpoint(path) is inspected and len(calls) == 1  # Lightning's load reuses it
    assert io.load_checkpoint(path)["global_step"] == 7 and len(calls) == 2  # held once, not forever


def test_module_checkpoints_hold_the_adapter_only_and_restore_rng_at_train_start():
    module = _module({"mlflow_run_id": "r1"})
    saved: dict = {"state_dict": module.state_dict()}
    assert any("lora_" not in k for k in saved["state_dict"])  # the frozen base is in the module's state dict ...
    module.on_save_checkpoint(saved)
    keys = list(saved["state_dict"])
    assert keys and all("lora_" in k for k in keys)  # ... but not in its checkpoints
    from peft import get_peft_model_state_dict

    adapter = module.adapter_state(module.state_dict())
    expected = get_peft_model_state_dict(module.model)
    assert adapter.keys() == expected.keys() and all(torch.equal(adapter[k], expected[k]) for k in expected)
    assert saved["medtee"]["run_info"] == {"mlflow_run_id": "r1"}
    expected = torch.rand(3)
    fresh = type(module)(module.model, module.cfg)
    fresh.on_load_checkpoint(saved)
    fresh.on_train_start()
    assert fresh.run_info == {"mlflow_run_id": "r1"}
    assert torch.equal(torch.rand(3), expected)  # the RNG is back where it was when the checkpoint was taken


def test_strategies():
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy
    from transformers.models.gemma3.modeling_gemma3 import Gemma3DecoderLayer

    from medtee import config
    from medtee.training.engine import strategy
    from medtee.training.model import build_model

    cfg = config.compose(["recipe=demo", "qlora=unquantized"])
    model = build_model(cfg.model, cfg.qlora, vocab_size=64, device="cpu")
    assert strategy(config.compose(["trainer.strategy=auto"]).trainer, model) == "auto"
    assert isinstance(strategy(config.compose(["trainer.strategy=ddp"]).trainer, model), DDPStrategy)
    fsdp = strategy(config.compose(["recipe=medgemma27b_h200_sev_snp", "trainer.strategy=fsdp"]).trainer, model)
    assert isinstance(fsdp, FSDPStrategy) and fsdp.kwargs["use_orig_params"]
    units = [m for m in model.modules() if fsdp.kwargs["auto_wrap_policy"]._lambda_fn(m)]
    layers = [m for m in units if isinstance(m, Gemma3DecoderLayer)]
    lora = [m for m in units if not isinstance(m, Gemma3DecoderLayer)]
    assert len(layers) == cfg.model.tiny.num_hidden_layers
    # LoRA matrices are units of their own: 2 per adapted linear layer (7 per decoder layer)
    assert len(lora) == 2 * 7 * len(layers) and all(m.weight.requires_grad for m in lora)


def test_the_8bit_adamw_choice_trains_the_lora_parameters_with_bitsandbytes():
    import bitsandbytes as bnb

    from medtee import config
    from medtee.training.model import build_model
    from medtee.training.module import CausalLMModule

    cfg = config.compose(["recipe=demo", "qlora=unquantized", "trainer.optimizer=adamw_8bit"])
    module = CausalLMModule(build_model(cfg.model, cfg.qlora, vocab_size=64, device="cpu"), cfg.trainer)
    optimizer = module.configure_optimizers()["optimizer"]
    assert isinstance(optimizer, bnb.optim.AdamW8bit)
    lora_b = [p for n, p in module.model.named_parameters() if "lora_B" in n]
    assert lora_b and all(float(p.abs().sum()) == 0 for p in lora_b)  # LoRA's zero init
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    module._loss({"input_ids": ids, "labels": ids}).backward()
    optimizer.step()
    assert all(float(p.abs().sum()) > 0 for p in lora_b)
