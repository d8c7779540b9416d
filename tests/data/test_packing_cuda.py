"""Packing parity on a GPU (skipped without CUDA): the CUDA attention kernels keep dialogues apart too."""

from __future__ import annotations

import pytest
import torch

from medtee.data.chat import IGNORE_INDEX
from medtee.data.module import DialogueDataModule
from medtee.data.synthetic import generate_dialogues
from medtee.data.tokenizer import build_demo_tokenizer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_packed_loss_equals_separate_losses_on_cuda(attn_implementation, dtype):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    tokenizer = build_demo_tokenizer()
    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=len(tokenizer), hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=128, intermediate_size=512, sliding_window=64,
                              layer_types=["sliding_attention", "full_attention"], max_position_embeddings=4096,
                              pad_token_id=tokenizer.pad_token_id, attn_implementation=attn_implementation)
    model = Gemma3ForCausalLM(config).to("cuda", dtype).train()
    module = DialogueDataModule(generate_dialogues(12, seed=3), tokenizer, max_length=2048, batch_size=3,
                                val_fraction=0.0, seed=0, packing=True)
    module.setup("fit")
    (batch,) = list(module.train_dataloader())
    batch = {k: v.cuda() for k, v in batch.items()}

    def losses(ids, labels, **inputs):
        logits = model(input_ids=ids, use_cache=False, **inputs).logits.float()
        return torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:],
                                                 ignore_index=IGNORE_INDEX, reduction="none")

    tolerance = 1e-4 if dtype == torch.float32 else 5e-2
    compared = 0
    with torch.no_grad():
        packed = losses(batch["input_ids"], batch["labels"], position_ids=batch["position_ids"])
        for row in range(batch["input_ids"].shape[0]):
            starts = (batch["position_ids"][row] == 0).nonzero().flatten().tolist()
            ends = starts[1:] + [batch["input_ids"].shape[1]]
            for start, end in zip(starts, ends):
                ids, labels = batch["input_ids"][row:row + 1, start:end], batch["labels"][row:row + 1, start:end]
                if (labels == IGNORE_INDEX).all():
                    continue  # the padding tail
                alone = losses(ids, labels)[0]
                supervised = labels[0, 1:] != IGNORE_INDEX
                torch.testing.assert_close(packed[row, start:end - 1][supervised], alone[supervised],
                                           rtol=tolerance, atol=tolerance)
                compared += 1
    assert compared == 12  # every dialogue (each longer than the sliding window), most of them packed
