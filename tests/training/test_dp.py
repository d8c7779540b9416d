"""DP-SGD (medtee.training.dp): per-dialogue clipping on the LoRA parameters only (4-bit base included), training
that logs the spent epsilon within the budget, noise the recipe's seed does not reproduce, and the compose-time
refusals of what Opacus cannot honour."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.loggers import Logger

from conftest import run_medtee
from medtee import config
from medtee.crypto.stream import derive_key
from medtee.schema import ConfigError
from medtee.training.config import dp_problems

DP_ON = ["privacy.dp.enabled=true"]


def _cfg(*overrides, qlora="unquantized"):
    return config.compose(["recipe=demo", f"qlora={qlora}", "data.max_length=64", "data.batch_size=4",
                           "trainer.max_steps=6", "trainer.limit_val_batches=0", "trainer.num_sanity_val_steps=0",
                           "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1", *overrides])


def _data(cfg, n=22):
    from medtee.data.module import DialogueDataModule
    from medtee.data.synthetic import generate_dialogues
    from medtee.data.tokenizer import build_demo_tokenizer

    d = cfg.data
    data = DialogueDataModule(generate_dialogues(n, seed=1), build_demo_tokenizer(), max_length=d.max_length,
                              batch_size=d.batch_size, val_fraction=0.0, seed=0)
    data.setup("fit")
    return data


def _module(cfg, data=None):
    from medtee.training.model import build_model
    from medtee.training.module import CausalLMModule

    from medtee.data.tokenizer import build_demo_tokenizer

    model = build_model(cfg.model, cfg.qlora, vocab_size=len(build_demo_tokenizer()), device="cpu")
    n = data.stats()["n_train"] if data is not None else 100
    return CausalLMModule(model, cfg.trainer, dp=cfg.privacy.dp, dataset_size=n, batch_size=cfg.data.batch_size)


def _lora(module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.model.named_parameters() if p.requires_grad}


class Recorder(Logger):
    """Metrics as Lightning logs them, in memory."""

    def __init__(self):
        super().__init__()
        self.logged: list[tuple[int, dict]] = []

    name = "recorder"
    version = 0

    def log_metrics(self, metrics, step=None):
        self.logged.append((step, dict(metrics)))

    def log_hyperparams(self, params, *args, **kwargs):
        pass


def _fit(cfg, data, module, tmp_path) -> Recorder:
    from medtee.training.checkpoint import EncryptedCheckpointIO
    from medtee.training.engine import build_trainer

    recorder = Recorder()
    trainer = build_trainer(cfg.trainer, cfg.hardware, metrics=(), model=module.model, logger=recorder,
                            out_dir=tmp_path, checkpoint_io=EncryptedCheckpointIO(derive_key(b"\x01" * 32, "a" * 64)))
    trainer.fit(module, datamodule=data)
    return recorder


def _batch(data, rows=3):
    return next(iter(data.train_dataloader())) if rows is None else {
        k: v[:rows] for k, v in next(iter(data.train_dataloader())).items()}


@pytest.mark.parametrize("qlora, chunk", [("unquantized", 7), ("nf4", 0)])  # several loss chunks a row; none
def test_each_dialogue_gradient_is_clipped_on_its_own_and_only_lora_gets_one(qlora, chunk):
    cfg = _cfg(*DP_ON, "privacy.dp.max_grad_norm=1e-4", "qlora.dropout=0", f"trainer.loss_chunk_tokens={chunk}",
               qlora=qlora)  # no dropout: a row alone and in the batch see the same network
    module = _module(cfg)
    optimizer = module.configure_optimizers()["optimizer"]
    optimizer.noise_multiplier = 0.0  # the clipped sum itself
    params = [p for p in module.model.parameters() if p.requires_grad]
    batch = _batch(_data(cfg))

    def clipped_sum(rows: dict) -> list[torch.Tensor]:
        optimizer.zero_grad(set_to_none=True)
        module._train_loss(rows).backward()
        optimizer.clip_and_accumulate()
        return [p.summed_grad.clone() for p in params]

    alone = [clipped_sum({k: v[i:i + 1] for k, v in batch.items()}) for i in range(3)]
    for grads in alone:  # every raw gradient is far above 1e-4: each is clipped to exactly the bound
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
        assert norm <= 1e-4 * (1 + 1e-4) and norm >= 1e-4 * (1 - 1e-3)
    together = clipped_sum(batch)  # the batch's clipped sum is the sum of the dialogues' own clipped gradients
    for k, g in enumerate(together):  # nf4: bf16 compute rounds a batch of 3 unlike a batch of 1
        expected = sum(a[k] for a in alone)
        assert (g - expected).norm() <= 2e-2 * expected.norm()
    frozen = [p for p in module.model.parameters() if not p.requires_grad]
    assert frozen and all(getattr(p, "grad_sample", None) is None for p in frozen)


def test_dp_training_logs_epsilon_each_epoch_within_budget_and_adds_noise(tmp_path):
    cfg = _cfg(*DP_ON, "privacy.dp.target_epsilon=4")
    data = _data(cfg)
    module = _module(cfg, data)
    before = _lora(module)
    recorder = _fit(cfg, data, module, tmp_path)
    epsilons = [m["train/epsilon"] for _, m in recorder.logged if "train/epsilon" in m]
    n = data.stats()["n_train"]
    assert n == 19 and len(epsilons) == 2  # in batches of 4: an epoch of 5 steps, then the step ending the run
    assert 0 < epsilons[0] < epsilons[1] <= 4 * 1.02  # within the accountant's search tolerance
    summary = module.dp_summary()
    assert summary["steps"] == 6 and summary["epsilon"] == pytest.approx(epsilons[1])
    assert summary["sample_rate"] == pytest.approx(4 / n) and summary["noise_multiplier"] > 0.3
    dp_update = {n: p - before[n] for n, p in _lora(module).items()}

    plain_cfg = _cfg()
    plain = _module(plain_cfg)
    assert plain.dp is None and plain.dp_summary() is None
    _fit(plain_cfg, _data(plain_cfg), plain, tmp_path / "plain")
    for name, update in dp_update.items():
        assert update.abs().max() > 0
        assert not torch.allclose(update, _lora(plain)[name] - before[name])


def test_the_noise_is_not_reproducible_from_the_recipe_seed():
    from medtee.training.config import DPConfig
    from medtee.training.dp import PrivateTraining

    def noised_gradient() -> torch.Tensor:
        torch.manual_seed(0)  # as the recipe's trainer.seed would
        layer = torch.nn.Linear(4, 2, bias=False)
        dp = PrivateTraining(layer, DPConfig(enabled=True), dataset_size=100, batch_size=2, steps=10)
        optimizer = dp.optimizer(torch.optim.SGD(layer.parameters(), lr=0.1))
        layer(torch.ones(2, 4)).sum().backward()
        optimizer.step()
        assert dp.accounted_steps() == 1 and 0 < dp.spent_epsilon() < 8
        return layer.weight.grad.clone()

    assert not torch.equal(noised_gradient(), noised_gradient())


def test_a_resumed_run_keeps_counting_the_epsilon_spent_before_it():
    cfg = _cfg(*DP_ON)
    first = _module(cfg)
    first.dp.accountant.step(noise_multiplier=first.dp.noise_multiplier, sample_rate=first.dp.sample_rate)
    saved = {"state_dict": first.state_dict(), "global_step": 1}
    first.on_save_checkpoint(saved)
    resumed = _module(cfg)
    resumed.on_load_checkpoint(saved)
    assert resumed.dp.accounted_steps() == 1 and resumed.dp.spent_epsilon() == first.dp.spent_epsilon() > 0
    del saved["medtee"]["dp_accountant"]  # as a run without DP writes it
    with pytest.raises(ValueError, match="written by a run without privacy.dp"):
        resumed.on_load_checkpoint(saved)


def test_a_delta_not_below_one_over_the_dialogue_count_is_refused():
    with pytest.raises(ConfigError, match=r"target_delta=0.1 must be below 1 / 19 \(the number of training"):
        cfg = _cfg(*DP_ON, "privacy.dp.target_delta=0.1")
        _module(cfg, _data(cfg))


def test_dp_problems_name_each_setting_opacus_cannot_honour():
    assert _problems(_cfg("data.packing=true")) == []  # DP off: no rule applies
    assert _problems(_cfg(*DP_ON)) == []
    from medtee.schema import ConfigError

    with pytest.raises(ConfigError) as refused:  # config.check applies them at compose time
        _cfg(*DP_ON, "data.packing=true", "trainer.accumulate_grad_batches=2", "trainer.strategy=ddp",
             "model.gradient_checkpointing=true", "model.compile_layers=true", "qlora.use_dora=true")
    found = [p for p in str(refused.value).split("; ") if p.startswith("privacy.dp.enabled")]
    keys = ["data.packing", "accumulate_grad_batches", "trainer.strategy", "gradient_checkpointing",
            "compile_layers", "use_dora"]
    assert len(found) == len(keys) and all(key in line and "privacy.dp.enabled" in line
                                           for key, line in zip(keys, found))


def _problems(cfg) -> list[str]:
    return dp_problems(cfg.privacy, cfg.data, cfg.trainer, cfg.hardware, model=cfg.model, qlora=cfg.qlora)


def test_packing_with_dp_is_refused_before_anything_runs(tmp_path):
    res = run_medtee("train", *DP_ON, "data.packing=true", "trainer.max_steps=1", cwd=tmp_path, timeout=120)
    assert res.returncode == 2, res.stderr[-2000:]
    assert "privacy.dp.enabled=true" in res.stderr and "data.packing=false" in res.stderr
