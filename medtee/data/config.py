"""The `data` config group's schema (OmegaConf structured config; no heavy imports)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Optional

from medtee.schema import below_minimums


class DataSource(str, Enum):
    synthetic = "synthetic"  # generated in-process by medtee.data.synthetic (the demo seals these before training)
    sealed = "sealed"  # a sealed dataset directory written by `medtee seal`


@dataclass
class DataConfig:
    source: DataSource = DataSource.synthetic  # where the training dialogues come from
    path: Optional[str] = None  # sealed dataset directory (source=sealed); not part of the recipe digest
    n_synthetic: int = 200  # number of generated dialogues (source=synthetic)
    synthetic_seed: int = 0  # generator seed (source=synthetic); ids are "synthetic:<synthetic_seed>:<i>"
    max_length: int = 512  # tokens per training sequence; longer dialogues are cut at the end (see docs/data.md)
    batch_size: int = 4  # sequences per micro-batch on each data-parallel rank
    val_fraction: float = 0.1  # share of dialogues held out for validation, in [0, 1)
    seed: int = 0  # split, packing and per-epoch shuffle seed
    packing: bool = False  # pack several dialogues per sequence (attention never crosses a dialogue boundary)

    def problems(self) -> list[str]:
        out = below_minimums(self, "data", {"batch_size": 1, "max_length": 32, "n_synthetic": 2})
        if not 0.0 <= self.val_fraction < 1.0:
            out.append(f"data.val_fraction={self.val_fraction} must be in [0, 1)")
        if self.source != DataSource.sealed and self.path:
            out.append(f"data.path={self.path} is set but data={self.source.value} does not read it: add "
                       f"data=sealed to train on the sealed dataset at that path")
        return out
