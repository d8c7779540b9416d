"""DP-SGD on the LoRA parameters with Opacus: per-dialogue gradient clipping, Gaussian noise, an RDP accountant.

- Per-sample gradients: Opacus's `GradSampleHooks` attach forward/backward hooks to the modules that hold trainable
  parameters, i.e. peft's LoRA `nn.Linear` matrices; the frozen base layers (bitsandbytes `Linear4bit` or plain
  `nn.Linear`), embeddings and norms get no hook. The peft model is not wrapped, so state-dict names, checkpoints
  and the saved adapter are unchanged.
- One sample is one batch row, i.e. one dialogue record (packing is refused: `config.dp_problems`). The loss of a
  batch is the mean of each dialogue's own mean token loss, so no dialogue's gradient depends on another's.
- Sampling: each step's batch is a Poisson sample, every training dialogue in it independently with probability
  q = min(1, batch_size / n_train) (`medtee.data.module.PoissonBatches`, Opacus's `UniformWithReplacementSampler`):
  exactly what the RDP accountant's bound is for. Batch sizes vary; a batch may be empty (`dialogue_losses`).
- `DPOptimizer` clips each dialogue's gradient to `max_grad_norm`, adds N(0, (noise_multiplier * max_grad_norm)^2)
  noise to the sum and divides by the expected batch size q * n_train, as after Opacus's own `DPDataLoader`: the
  hooks (`loss_reduction="mean"`) undo the mean over the batch's actual rows, whatever their number. The noise
  multiplier is Opacus's for (target_epsilon, target_delta) after `trainer.max_steps` steps at rate q. A resumed run
  whose checkpoint's spent steps and its remaining ones at that noise would exceed the target (more steps, another
  batch size) takes the least noise that keeps them all within it.
- Noise and sampling come from generators seeded from the OS (never the recipe's seed): the recipe is public, neither
  must be reproducible from it.
"""

from __future__ import annotations

import secrets
import warnings

import torch

from medtee.schema import ConfigError

# the first LoRA layer's input (frozen embeddings) needs no gradient; Opacus's hooks use the output's only
warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed with respect to "
                                          "module outputs", category=UserWarning)

# with most of a budget spent, the least noise for the rest is large and RDP's best order the largest it tries; the
# bound it gives is still valid (only looser)
warnings.filterwarnings("ignore", message="Optimal order is the largest alpha", category=UserWarning)

ACCOUNTANT = "rdp"
SAMPLING = ("Poisson: each training dialogue in each step's batch independently with probability sample_rate "
            "(Opacus's UniformWithReplacementSampler), as the accountant assumes")


class PrivateTraining:
    """DP-SGD for one peft model: per-sample gradient hooks, the DP optimizer and the privacy accountant."""

    def __init__(self, model, dp_cfg, *, dataset_size: int, batch_size: int, steps: int):
        from opacus.accountants import RDPAccountant
        from opacus.accountants.utils import get_noise_multiplier
        from opacus.grad_sample import GradSampleHooks

        if dataset_size < 1 or batch_size < 1 or steps < 1:
            raise ValueError(f"DP training needs dataset_size, batch_size and steps >= 1 (got {dataset_size}, "
                             f"{batch_size}, {steps})")
        if dp_cfg.target_delta >= 1 / dataset_size:
            raise ConfigError(f"privacy.dp.target_delta={dp_cfg.target_delta} must be below 1 / {dataset_size} "
                              f"(the number of training dialogues): a larger delta allows leaking a whole dialogue")
        self.cfg = dp_cfg
        self.batch_size, self.steps = batch_size, steps
        self.sample_rate = min(1.0, batch_size / dataset_size)
        self.expected_batch_size = min(batch_size, dataset_size)  # sample_rate * dataset_size, exactly
        self.noise_multiplier = float(get_noise_multiplier(
            target_epsilon=dp_cfg.target_epsilon, target_delta=dp_cfg.target_delta, sample_rate=self.sample_rate,
            steps=steps, accountant=ACCOUNTANT))
        self.accountant = RDPAccountant()
        self.hooks = GradSampleHooks(model, batch_first=True, loss_reduction="mean")
        self._optimizer = None

    def optimizer(self, optimizer: torch.optim.Optimizer):
        """`optimizer` (over the LoRA parameters) behind Opacus's DPOptimizer; every step is accounted."""
        from opacus.optimizers import DPOptimizer

        device = optimizer.param_groups[0]["params"][0].device
        generator = torch.Generator(device=device)
        generator.manual_seed(secrets.randbits(63))
        dp_optimizer = DPOptimizer(optimizer, noise_multiplier=self.noise_multiplier,
                                   max_grad_norm=self.cfg.max_grad_norm, expected_batch_size=self.expected_batch_size,
                                   loss_reduction="mean", generator=generator)
        dp_optimizer.attach_step_hook(self._account)
        self._optimizer = dp_optimizer
        return dp_optimizer

    def _account(self, optimizer) -> None:
        self.accountant.step(noise_multiplier=optimizer.noise_multiplier, sample_rate=self.sample_rate)

    def spent_epsilon(self) -> float:
        """Epsilon spent so far at the target delta (0 before the first step)."""
        return float(self.accountant.get_epsilon(self.cfg.target_delta)) if len(self.accountant) else 0.0

    def summary(self) -> dict:
        """What the run records: the guarantee spent and the mechanism's parameters."""
        return {"epsilon": self.spent_epsilon(), "delta": self.cfg.target_delta,
                "target_epsilon": self.cfg.target_epsilon, "noise_multiplier": self.noise_multiplier,
                "max_grad_norm": self.cfg.max_grad_norm, "sample_rate": self.sample_rate,
                "expected_batch_size": self.expected_batch_size, "steps": self.accounted_steps(),
                "accountant": ACCOUNTANT, "sampling": SAMPLING}

    def accounted_steps(self) -> int:
        return sum(steps for _, _, steps in self.accountant.history)

    def check_sampling(self, loader) -> None:
        """Refuse a training loader that does not Poisson-sample at this run's rate: the guarantee would not hold."""
        rate = getattr(loader, "sample_rate", None)
        if getattr(loader, "SAMPLING", None) != "poisson" or rate is None or abs(rate - self.sample_rate) > 1e-12:
            raise ValueError(f"privacy.dp: the training batches are not Poisson samples at the accounted rate "
                             f"q={self.sample_rate:.6g}, so the accountant's epsilon would not bound them: build the "
                             f"data module with DialogueDataModule(poisson=True) and the same batch_size")

    def state_dict(self) -> dict:
        """The accountant's history (checkpointed: a resumed run keeps counting what was spent)."""
        return self.accountant.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """Restore a checkpoint's accountant, and raise the noise of this run's remaining steps where the spent steps
        and them at the planned noise would exceed the target epsilon. ValueError when the checkpoint's run alone
        spent it."""
        self.accountant.load_state_dict(state)
        left = self.steps - self.accounted_steps()
        if left > 0 and self._epsilon_after(self.noise_multiplier, left) > self.cfg.target_epsilon:
            self.noise_multiplier = self._least_noise_within_target(left)
            if self._optimizer is not None:
                self._optimizer.noise_multiplier = self.noise_multiplier

    def _epsilon_after(self, noise_multiplier: float, steps: int) -> float:
        """The epsilon of the history so far followed by `steps` steps at `noise_multiplier` and this run's rate."""
        from opacus.accountants import RDPAccountant

        accountant = RDPAccountant()
        accountant.history = [*self.accountant.history, (noise_multiplier, self.sample_rate, steps)]
        return float(accountant.get_epsilon(self.cfg.target_delta))

    def _least_noise_within_target(self, steps: int) -> float:
        """The noise multiplier (to Opacus's search tolerance of 0.01 in epsilon) at which `steps` more steps keep the
        whole run within the target; as it grows their cost goes to 0, so one exists unless the history spent it."""
        target, spent = self.cfg.target_epsilon, self.spent_epsilon()
        if spent >= target:
            raise ValueError(f"privacy.dp: the checkpoint's run already spent epsilon {spent:.3g} of "
                             f"privacy.dp.target_epsilon={target:g}; no further step fits within it")
        low, high = 0.0, max(self.noise_multiplier, 1.0)
        while self._epsilon_after(high, steps) > target:
            low, high = high, 2 * high
        while target - self._epsilon_after(high, steps) > 0.01 and high - low > 1e-6 * high:
            middle = (low + high) / 2
            low, high = (low, middle) if self._epsilon_after(middle, steps) <= target else (middle, high)
        return high


def dialogue_losses(causal_lm, batch: dict, *, chunk_tokens: int) -> torch.Tensor:
    """Each batch row's mean token loss, shape (batch,), by the chunked loss (`chunk_tokens` 0: a row per chunk).

    A batch without rows (Poisson sampling drew no dialogue) gives one zero loss over a data-independent stand-in
    row: Opacus's hooks still fire (the model cannot run on zero rows), its per-sample gradient is zero, and the
    step adds noise and is accounted like any other."""
    from medtee.training.loss import chunked_causal_lm_loss

    if batch["input_ids"].shape[0] == 0:
        stand_in = torch.zeros((1, 1), dtype=torch.long, device=batch["input_ids"].device)
        return causal_lm.model(input_ids=stand_in).last_hidden_state.sum(dim=(1, 2)) * 0.0
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")}
    hidden = causal_lm.model(**inputs).last_hidden_state
    labels = batch["labels"]
    chunk = chunk_tokens or labels.shape[1]
    softcap = getattr(causal_lm.config, "final_logit_softcapping", None)
    return torch.stack([chunked_causal_lm_loss(hidden[i:i + 1], causal_lm.lm_head, labels[i:i + 1],
                                               chunk_tokens=chunk, softcap=softcap) for i in range(len(hidden))])
