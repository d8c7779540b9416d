"""Run `medtee` under torchrun with FSDP on CPU processes (gloo), to test medtee's FSDP path where there is no GPU.

medtee refuses `trainer.strategy=fsdp` off CUDA, as Lightning's FSDP is meant for CUDA only. This wrapper lifts
exactly that: medtee's rule, and it gives FSDP the CPU as its device. Full state dicts are gathered without
`offload_to_cpu`, which on CPU would alias memory FSDP frees. Everything else is medtee as shipped.

usage: python -m torch.distributed.run ... fsdp_on_cpu.py medtee-arguments...
"""

from __future__ import annotations

import sys

import lightning.pytorch.strategies.fsdp as lightning_fsdp
import torch
from torch.distributed.fsdp import FullStateDictConfig, FullyShardedDataParallel, StateDictType
from torch.distributed.fsdp.api import FullOptimStateDictConfig

from medtee import config
from medtee.cli import main

config.FSDP_ACCELERATORS = ("cuda", "cpu")
_init = FullyShardedDataParallel.__init__


def _init_on_cpu(self, *args, device_id=None, **kwargs) -> None:
    _init(self, *args, device_id=torch.device("cpu") if device_id is None else device_id, **kwargs)


def _full_state_dict_in_place(module, world_size, rank0_only=True):
    return FullyShardedDataParallel.state_dict_type(
        module, StateDictType.FULL_STATE_DICT, FullStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only),
        FullOptimStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only))


FullyShardedDataParallel.__init__ = _init_on_cpu
lightning_fsdp._get_full_state_dict_context = _full_state_dict_in_place
sys.exit(main(sys.argv[1:]))
