"""DP-SGD (medtee.training.dp): Poisson-sampled batches at the accounted rate (variable sizes, empty ones a noise-only
step), the noisy sum scaled by the expected batch size as after Opacus's DPDataLoader, per-dialogue clipping on the
LoRA parameters only (4-bit base included), training that logs the spent epsilon within the budget, noise the
recipe's seed does not reproduce, resume, and the compose-time refusals of what Opacus cannot honour."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import Logger
from scipy import stats

from conftest import run_medtee
from medtee import config
from medtee.crypto.stream import derive_key
from medtee.schema import ConfigError
from medtee.training.config import dp_problems

DP_ON = ["privacy.dp.enabled=true"]


def _cfg(*overrides, qlora="unquantized", batch_size=4):
    return config.compose(["recipe=demo", f"qlora={qlora}", "data.max_length=64", f"data.batch_size={batch_size}",
                           "trainer.max_steps=6", "trainer.limit_val_batches=0", "trainer.num_sanity_val_steps=0",
                           "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1", *overrides])


def _data(cfg, n=22, *, poisson=None):
    from medtee.data.module import DialogueDataModule
    from medtee.data.synthetic import generate_dialogues
    from medtee.data.tokenizer import build_demo_tokenizer

    d = cfg.data
    data = DialogueDataModule(generate_dialogues(n, seed=1), build_demo_tokenizer(), max_length=d.max_length,
                              batch_size=d.batch_size, val_fraction=0.0, seed=0,
                              poisson=cfg.privacy.dp.enabled if poisson is None else poisson)
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


def _fit(cfg, data, module, tmp_path, ckpt_path=None) -> Recorder:
    from medtee.training.checkpoint import EncryptedCheckpointIO
    from medtee.training.engine import build_trainer

    recorder = Recorder()
    trainer = build_trainer(cfg.trainer, cfg.hardware, metrics=(), model=module.model, logger=recorder,
                            out_dir=tmp_path, checkpoint_io=EncryptedCheckpointIO(derive_key(b"\x01" * 32, "a" * 64)))
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return recorder


def _batch(cfg, rows=3):
    """`rows` training dialogues as one padded batch (a fixed one: from the loader without Poisson sampling)."""
    return {k: v[:rows] for k, v in next(iter(_data(cfg, poisson=False).train_dataloader())).items()}


def _empty_batch(cfg):
    """A batch Poisson sampling drew no dialogue for, as the DP loader serves it."""
    loader = _data(cfg, poisson=True).train_dataloader()
    while True:  # P(empty) is (1 - q)^n, about 0.12 here: one turns up within a few epochs
        empty = next((b for b in loader if b["input_ids"].shape[0] == 0), None)
        if empty is not None:
            return empty


def _sizes_and_counts(loader, steps: int, split) -> tuple[list[int], np.ndarray]:
    """Batch sizes of `steps` batches, and how often each training dialogue was in one (rows matched by tokens)."""
    index = {tuple(split.input_ids[split.offsets[i]:split.offsets[i + 1]].tolist()): i for i in range(len(split))}
    assert len(index) == len(split), "the test needs distinct dialogues"
    sizes, counts = [], np.zeros(len(split), np.int64)
    while len(sizes) < steps:
        for batch in loader:
            sizes.append(batch["input_ids"].shape[0])
            for row, mask in zip(batch["input_ids"], batch["attention_mask"]):
                counts[index[tuple(row[mask.bool()].tolist())]] += 1
    return sizes[:steps], counts


@pytest.mark.parametrize("qlora, chunk", [("unquantized", 7), ("nf4", 0)])  # several loss chunks a row; none
def test_each_dialogue_gradient_is_clipped_on_its_own_and_only_lora_gets_one(qlora, chunk):
    cfg = _cfg(*DP_ON, "privacy.dp.max_grad_norm=1e-4", "qlora.dropout=0", f"trainer.loss_chunk_tokens={chunk}",
               qlora=qlora)  # no dropout: a row alone and in the batch see the same network
    module = _module(cfg)
    optimizer = module.configure_optimizers()["optimizer"]
    optimizer.noise_multiplier = 0.0  # the clipped sum itself
    params = [p for p in module.model.parameters() if p.requires_grad]
    batch = _batch(cfg)

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


def test_dp_batches_are_poisson_samples_at_the_accounted_rate():
    cfg = _cfg(*DP_ON, batch_size=2)
    data = _data(cfg)
    loader, split = data.train_dataloader(), data.training_split()
    n, steps = len(split), 1800
    q = 2 / n
    assert n == 19 and loader.sample_rate == pytest.approx(q) and len(loader) == 9  # Opacus's epoch: int(1 / q)
    assert _module(cfg, data).dp.sample_rate == loader.sample_rate  # the rate the accountant counts
    sizes, counts = _sizes_and_counts(loader, steps, split)
    assert 0 in sizes and len(set(sizes)) >= 5  # sizes vary around 2, empty batches included
    # every dialogue in every step independently with probability q: n x steps Bernoulli(q) draws in all, ...
    assert stats.binomtest(int(counts.sum()), n * steps, q).pvalue > 1e-6
    assert stats.chisquare(counts).pvalue > 1e-6  # ... no dialogue favoured, ...
    # ... so a batch's size is Binomial(n, q) (fixed-size batches, all of size 2, fail this by far); the tail
    # from `top` up is one bin, so that every bin expects at least 5 batches
    top = max(k for k in range(n + 1) if stats.binom.sf(k - 1, n, q) * steps >= 5)
    observed = [sizes.count(k) for k in range(top)] + [sum(size >= top for size in sizes)]
    expected = [stats.binom.pmf(k, n, q) * steps for k in range(top)] + [stats.binom.sf(top - 1, n, q) * steps]
    assert stats.chisquare(observed, expected).pvalue > 1e-6


@pytest.mark.parametrize("max_grad_norm", [1e-4, 1e6])  # every dialogue's gradient clipped; none
def test_the_noiseless_dp_gradient_is_the_clipped_sum_over_the_expected_batch_size(max_grad_norm):
    cfg = _cfg(*DP_ON, f"privacy.dp.max_grad_norm={max_grad_norm}", "qlora.dropout=0")
    module = _module(cfg)  # 100 dialogues, batch_size 4: q = 0.04, expected batch size 4
    optimizer = module.configure_optimizers()["optimizer"]
    optimizer.noise_multiplier = 0.0
    params = [p for p in module.model.parameters() if p.requires_grad]
    batch = _batch(cfg, rows=3)  # a Poisson batch of 3 rows: the sum must still be divided by 4
    by_hand = [torch.zeros_like(p) for p in params]
    for i in range(3):
        grads = torch.autograd.grad(module._train_loss({k: v[i:i + 1] for k, v in batch.items()}), params)
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
        factor = min(1.0, max_grad_norm / (float(norm) + 1e-6))  # Opacus's clipping factor
        by_hand = [total + factor * g for total, g in zip(by_hand, grads)]
    optimizer.zero_grad(set_to_none=True)  # drops the per-sample gradients the hooks kept above
    module._train_loss(batch).backward()
    assert optimizer.pre_step()  # clip, noise (none), scale: p.grad as the inner optimizer would step on it
    for p, total in zip(params, by_hand):
        assert (p.grad - total / 4).norm() <= 1e-4 * (total / 4).norm()
    assert module.dp.expected_batch_size == 4


def test_an_empty_batch_is_a_noise_only_step_and_is_accounted():
    cfg = _cfg(*DP_ON, "qlora.dropout=0")
    module = _module(cfg, _data(cfg))
    optimizer = module.configure_optimizers()["optimizer"]
    params = [p for p in module.model.parameters() if p.requires_grad]
    empty = _empty_batch(cfg)
    assert empty["input_ids"].shape == empty["labels"].shape == (0, 0)

    def gradient(noise_multiplier: float) -> torch.Tensor:
        optimizer.noise_multiplier = noise_multiplier
        optimizer.zero_grad(set_to_none=True)
        loss = module.training_step(empty, 0)  # logs nothing: no trainer needed
        assert float(loss) == 0.0 and module.first_loss is None
        loss.backward()
        assert optimizer.pre_step()
        return torch.cat([p.grad.flatten() for p in params])

    assert gradient(0.0).abs().max() == 0  # the stand-in row contributes nothing
    noise = gradient(module.dp.noise_multiplier)  # the noise alone, over the expected batch size
    std = module.dp.noise_multiplier * cfg.privacy.dp.max_grad_norm / module.dp.expected_batch_size
    assert noise.numel() > 10_000 and noise.std() == pytest.approx(std, rel=0.05) and abs(noise.mean()) < 0.05 * std
    assert module.dp.accounted_steps() == 2


def test_a_run_whose_every_draw_is_empty_still_takes_noisy_accounted_steps(tmp_path, monkeypatch):
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler

    monkeypatch.setattr(UniformWithReplacementSampler, "__iter__", lambda self: iter([[]] * self.steps))
    cfg = _cfg(*DP_ON)
    data = _data(cfg)
    module = _module(cfg, data)
    before = _lora(module)
    recorder = _fit(cfg, data, module, tmp_path)
    assert module.dp.accounted_steps() == 6 and module.first_loss is None
    assert not any("train/loss" in metrics for _, metrics in recorder.logged)
    assert all((p != before[name]).any() for name, p in _lora(module).items())  # the noise moved every tensor


def test_dp_training_refuses_batches_not_poisson_sampled_at_the_accounted_rate(tmp_path):
    cfg = _cfg(*DP_ON)
    for data in (_data(cfg, poisson=False), _data(_cfg(*DP_ON, batch_size=2))):  # shuffled; another rate
        with pytest.raises(ValueError, match=r"not Poisson samples at the accounted rate q=0\.210526"):
            _fit(cfg, data, _module(cfg, data), tmp_path)


def test_a_dp_run_resumes_with_fresh_sampling_and_keeps_counting(tmp_path):
    cfg = _cfg(*DP_ON, "trainer.checkpoint_every_n_steps=3")
    data = _data(cfg)
    first = _module(cfg, data)
    logged = _fit(cfg, data, first, tmp_path / "first").logged
    checkpoint = tmp_path / "first/checkpoints/step-0000003.ckpt.enc"
    assert checkpoint.is_file() and first.dp.accounted_steps() == 6
    again = _data(cfg)
    resumed = _module(cfg, again)
    relogged = _fit(cfg, again, resumed, tmp_path / "resumed", ckpt_path=checkpoint).logged
    # the accountant went on from the checkpoint's 3 steps, and the epoch ended where it did (after step 4)
    assert resumed.dp.accounted_steps() == 6 and resumed.dp.spent_epsilon() == first.dp.spent_epsilon()
    epsilons = [(step, m["train/epsilon"]) for step, m in logged if "train/epsilon" in m]
    assert [(step, m["train/epsilon"]) for step, m in relogged if "train/epsilon" in m] == epsilons[-2:]
    assert again.state_dict()["epoch"] == 1 and again.state_dict()["position"] == 2


def test_medtee_train_with_dp_records_poisson_sampling(tmp_path):
    res = run_medtee("train", *DP_ON, "trainer.max_steps=4", cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    [summary] = tmp_path.glob("outputs/*/*/summary.json")
    summary = json.loads(summary.read_text())
    dp = summary["privacy"]["dp"]
    assert dp["steps"] == 4 and 0 < dp["epsilon"] <= 8 * 1.02 and dp["sampling"].startswith("Poisson")
    assert dp["sample_rate"] == pytest.approx(dp["expected_batch_size"] / summary["examples"]["train"])


def test_dp_training_logs_epsilon_each_epoch_within_budget_and_adds_noise(tmp_path):
    cfg = _cfg(*DP_ON, "privacy.dp.target_epsilon=4")
    data = _data(cfg)
    module = _module(cfg, data)
    before = _lora(module)
    recorder = _fit(cfg, data, module, tmp_path)
    epsilons = [m["train/epsilon"] for _, m in recorder.logged if "train/epsilon" in m]
    assert not any("train/loss" in m or "train/tokens_per_s" in m for _, m in recorder.logged)  # docs/training.md
    assert module.first_loss is None
    n = data.stats()["n_train"]
    assert n == 19 and len(epsilons) == 2  # q = 4/19: an epoch of int(1/q) = 4 steps, then the 2 ending the run
    assert 0 < epsilons[0] < epsilons[1] <= 4 * 1.02  # within the accountant's search tolerance
    summary = module.dp_summary()
    assert summary["steps"] == 6 and summary["epsilon"] == pytest.approx(epsilons[1])
    assert summary["sample_rate"] == pytest.approx(4 / n) and summary["noise_multiplier"] > 0.3
    assert summary["expected_batch_size"] == 4 and summary["sampling"].startswith("Poisson")
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


def test_a_resume_with_more_steps_or_another_batch_size_stays_within_the_target_epsilon():
    """The noise used to be Opacus's for the target over the resumed run's max_steps alone, on top of the
    checkpoint's spent history: raising max_steps by 1000 at each resume spent 2.99, 3.57, 3.95, ... (target 3)."""
    from medtee.training.config import DPConfig
    from medtee.training.dp import PrivateTraining

    cfg = DPConfig(enabled=True, target_epsilon=3.0, target_delta=1e-5)

    def run(steps: int, batch_size: int = 100) -> PrivateTraining:
        return PrivateTraining(torch.nn.Linear(4, 2, bias=False), cfg, dataset_size=10_000, batch_size=batch_size,
                               steps=steps)

    first = run(1000)
    first.accountant.history = [(first.noise_multiplier, first.sample_rate, 1000)]  # as 1000 accounted steps
    assert 2.9 < first.spent_epsilon() <= 3.0
    for steps, batch_size in ((2000, 100), (11_000, 100), (2000, 400)):
        resumed = run(steps, batch_size)
        planned = resumed.noise_multiplier
        resumed.load_state_dict(first.state_dict())
        assert resumed._epsilon_after(planned, steps - 1000) > 3.05  # the planned noise would overspend
        epsilon = resumed._epsilon_after(resumed.noise_multiplier, steps - 1000)
        assert 2.98 <= epsilon <= 3.0 and resumed.noise_multiplier > planned, (steps, batch_size)
    same = run(1000)
    same.load_state_dict(first.state_dict())
    assert same.noise_multiplier == first.noise_multiplier  # nothing left to train: unchanged
    spent = run(6000)
    spent.accountant.history = [(0.5, 0.01, 5000)]  # a run that spent far more than 3
    with pytest.raises(ValueError, match=r"already spent epsilon .* of privacy.dp.target_epsilon=3"):
        spent.load_state_dict(spent.state_dict())


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
