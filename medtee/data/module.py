"""The LightningDataModule: decrypted chat records to batches, in memory only.

Imports torch and lightning: only the training code imports this module, never the CLI at start-up.

- The tokenizer's own chat template is checked against medtee's training text when the module is built
  (`chat.check_chat_template`). In `setup()`, before any training work, records are checked (`validate.record_turns`:
  a `DataError` names the record by position) and tokenized in chunks (one batched tokenizer call per chunk) in one
  pass, then the dataset (`validate.check_dataset`: some record has a doctor turn); the module keeps token arrays
  only and drops its reference to the records. Nothing is written anywhere; batches are cut from the arrays in the
  training process (no worker processes).
- Split: a permutation of the record positions by `seed`; the first `round(val_fraction * n)` records (at least one
  when val_fraction > 0) are validation. Dialogues left with no supervised token are dropped after the split.
- Packing (optional): dialogues are packed into rows of at most `max_length` tokens (best-fit decreasing). Each
  packed batch has `position_ids` restarting at 0 at every dialogue and no `attention_mask`: from that,
  transformers 5 builds a block-diagonal causal mask (sliding-window layers included) so attention never crosses a
  dialogue boundary. The model must be called without a KV cache (`use_cache=False`), as in training.
- Each epoch shuffles the training items by (seed, epoch); data-parallel ranks take disjoint strided shares of equal
  size (the `len % world_size` remainder sits the epoch out; it changes from epoch to epoch).
- `poisson=True` (DP-SGD, `privacy.dp`): each training batch is instead a Poisson sample of the training dialogues
  (`PoissonBatches`, Opacus's sampler), the sampling DP-SGD's accountant assumes; validation is unchanged.
- The training loader is stateful (epoch and batches served): Lightning saves it in checkpoints and restores it on
  resume, and `DialogueDataModule.state_dict()` exposes the same state.
"""

from __future__ import annotations

import bisect
import secrets
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import islice

import numpy as np
import torch
from lightning.pytorch import LightningDataModule

from medtee.data import DataError
from medtee.data.chat import IGNORE_INDEX, check_chat_template, encode_turns
from medtee.data.validate import check_dataset, record_turns

_TOKENIZE_CHUNK = 512  # records per batched tokenizer call


@dataclass(repr=False)
class TokenizedRecords:
    """Ragged token arrays: example i is `input_ids[offsets[i]:offsets[i + 1]]` (labels alike)."""

    input_ids: np.ndarray  # int32, all examples concatenated
    labels: np.ndarray  # int32, IGNORE_INDEX where no loss
    offsets: np.ndarray  # int64, n + 1 boundaries
    truncated: np.ndarray  # bool per example: cut at max_length

    def wipe(self) -> None:
        """Overwrite the token arrays with zeros, in place (the token ids are the dialogues' text)."""
        for array in (self.input_ids, self.labels):
            array.fill(0)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __repr__(self) -> str:  # counts only: the token ids are the dialogues' text
        return f"TokenizedRecords(examples={len(self)}, tokens={len(self.input_ids)})"

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def supervised(self) -> np.ndarray:
        """Supervised-token count of every example."""
        cumulative = np.concatenate([[0], np.cumsum(self.labels != IGNORE_INDEX, dtype=np.int64)])
        return cumulative[self.offsets[1:]] - cumulative[self.offsets[:-1]]

    def select(self, indices: np.ndarray) -> TokenizedRecords:
        lengths = self.lengths()[indices]
        spans = [np.arange(self.offsets[i], self.offsets[i + 1]) for i in indices]
        flat = np.concatenate(spans) if spans else np.zeros(0, np.int64)
        return TokenizedRecords(self.input_ids[flat], self.labels[flat],
                                np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64), self.truncated[indices])


def tokenize_records(records: Iterable[dict], tokenizer, *, max_length: int,
                     chunk: int = _TOKENIZE_CHUNK) -> TokenizedRecords:
    """Check (`validate.record_turns`) and tokenize chat records, streamed `chunk` at a time, into ragged arrays;
    every record keeps its position (one without a doctor turn has no token)."""
    ids_parts, label_parts, lengths, truncated = [], [], [], []
    turns = record_turns(records, tokenizer)
    while batch := list(islice(turns, chunk)):
        # One token over the limit tells a cut dialogue from one that is exactly max_length long.
        for ids, labels in encode_turns(tokenizer, batch, max_length=max_length + 1):
            truncated.append(len(ids) > max_length)
            ids_parts.append(ids[:max_length])
            label_parts.append(labels[:max_length])
            lengths.append(min(len(ids), max_length))
    empty = np.zeros(0, np.int32)
    return TokenizedRecords(
        np.concatenate(ids_parts) if ids_parts else empty,
        np.concatenate(label_parts) if label_parts else empty,
        np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int64),
        np.asarray(truncated, bool),
    )


def pack(lengths: np.ndarray, max_length: int, *, seed: int) -> list[np.ndarray]:
    """Rows of example indices whose lengths sum to <= max_length, by best-fit decreasing.

    Longest first (ties in a seeded order), each into the fullest row it still fits: rows come out about 99% full
    on real dialogue lengths, against about 80% for filling rows in arrival order.
    """
    rank = np.random.default_rng(seed).permutation(len(lengths))
    order = np.lexsort((rank, -np.asarray(lengths)))
    free: list[int] = []  # free space of the open rows, ascending
    owner: list[int] = []  # the row each `free` entry belongs to
    rows: list[list[int]] = []
    for index in order.tolist():
        length = int(lengths[index])
        k = bisect.bisect_left(free, length)
        if k == len(free):
            row, space = len(rows), max_length - length
            rows.append([index])
        else:
            row, space = owner.pop(k), free.pop(k) - length
            rows[row].append(index)
        k = bisect.bisect_left(free, space)
        free.insert(k, space)
        owner.insert(k, row)
    return [np.asarray(row) for row in rows]


class Batches:
    """A sized, stateful iterable of batches (Lightning checkpoints its `state_dict`).

    `items[k]` is an array of example indices (one per padded row, several per packed row). The order of an epoch
    is a permutation by (seed, epoch) when `shuffle`; this rank takes every `world_size`-th item from `rank`.
    """

    SAMPLING: str | None = None  # how batches are drawn, when not by shuffling (in the state: resume checks it)

    def __init__(self, data: TokenizedRecords, items: list[np.ndarray], *, batch_size: int, packed: bool,
                 pad_id: int, seed: int, shuffle: bool, rank: int, world_size: int):
        self._data, self._items, self._packed, self._pad_id = data, items, packed, pad_id
        self._lengths = data.lengths()
        self._batch_size, self._seed, self._shuffle = batch_size, seed, shuffle
        self._rank, self._world_size = rank, world_size
        self._share = len(items) // world_size
        self.epoch = 0  # epochs completed
        self.position = 0  # batches served in the current epoch

    def __len__(self) -> int:
        return -(-self._share // self._batch_size)

    def _fingerprint(self) -> dict:
        return {"items": len(self._items), "batch_size": self._batch_size, "packed": self._packed,
                "seed": self._seed, "world_size": self._world_size}

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, **self._fingerprint()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("sampling") != self.SAMPLING:
            raise ValueError(f"cannot resume the data position: the checkpoint's batches were drawn by "
                             f"{state.get('sampling') or 'shuffling'}, this run's by {self.SAMPLING or 'shuffling'} "
                             f"(resume with the privacy.dp.enabled setting of the run that wrote it)")
        expected = self._fingerprint()
        changed = [key for key, value in expected.items() if state.get(key) != value]
        if changed:
            raise ValueError(f"cannot resume the data position: {', '.join(changed)} differ from the checkpoint's "
                             "(resume with the same dataset, data settings and number of devices)")
        if not 0 <= state["position"] < max(len(self), 1):
            raise ValueError(f"cannot resume the data position: batch {state['position']} is past the epoch's "
                             f"{len(self)} batches")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    def _order(self) -> np.ndarray:
        order = np.arange(len(self._items))
        if self._shuffle:
            order = np.random.default_rng([self._seed, self.epoch]).permutation(len(self._items))
        return order[self._rank:self._share * self._world_size:self._world_size]

    def __iter__(self) -> Iterator[dict]:
        order, total = self._order(), len(self)
        for number in range(self.position, total):
            rows = [self._items[k] for k in order[number * self._batch_size:(number + 1) * self._batch_size]]
            batch = self._collate(rows)
            if number + 1 == total:  # the epoch is complete once its last batch is handed out
                self.epoch, self.position = self.epoch + 1, 0
            else:
                self.position = number + 1
            yield batch

    def _collate(self, rows: list[np.ndarray]) -> dict:
        """Padded (or packed) tensors of `rows`; no row (a Poisson sample may draw none): tensors of shape (0, 0)."""
        data = self._data
        width = max((int(self._lengths[row].sum()) for row in rows), default=0)
        input_ids = torch.full((len(rows), width), self._pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        if self._packed:
            position_ids = torch.zeros((len(rows), width), dtype=torch.long)
        else:
            attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, row in enumerate(rows):
            cursor = 0
            for example in row:
                start, end = data.offsets[example], data.offsets[example + 1]
                n = int(end - start)
                input_ids[r, cursor:cursor + n] = torch.from_numpy(data.input_ids[start:end].astype(np.int64))
                labels[r, cursor:cursor + n] = torch.from_numpy(data.labels[start:end].astype(np.int64))
                if self._packed:
                    position_ids[r, cursor:cursor + n] = torch.arange(n)
                cursor += n
            if self._packed:  # the padding tail is a segment of its own, so no dialogue attends to it
                position_ids[r, cursor:] = torch.arange(width - cursor)
            else:
                attention_mask[r, :cursor] = 1
        if self._packed:
            return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


class PoissonBatches(Batches):
    """DP-SGD's training batches: each holds every training dialogue independently with probability
    `sample_rate` = min(1, batch_size / n), drawn by Opacus's `UniformWithReplacementSampler` (the sampling its RDP
    accountant assumes), so sizes vary around batch_size and a batch may have no row.

    The sampler's generator is seeded from the OS, not from `seed`: the recipe is public, and which dialogues a
    step saw must not be reproducible from it. An epoch is Opacus's int(1 / sample_rate) steps. The state (epoch,
    batches served) keeps epoch boundaries across a resume; the draws after it are fresh.
    """

    SAMPLING = "poisson"

    def __init__(self, data: TokenizedRecords, *, batch_size: int, pad_id: int, seed: int):
        from opacus.utils.uniform_sampler import UniformWithReplacementSampler

        super().__init__(data, [np.asarray([i]) for i in range(len(data))], batch_size=batch_size, packed=False,
                         pad_id=pad_id, seed=seed, shuffle=False, rank=0, world_size=1)
        self.sample_rate = min(1.0, batch_size / len(data))
        generator = torch.Generator()
        generator.manual_seed(secrets.randbits(63))
        self._sampler = UniformWithReplacementSampler(num_samples=len(data), sample_rate=self.sample_rate,
                                                      generator=generator)

    def __len__(self) -> int:
        return len(self._sampler)

    def _fingerprint(self) -> dict:
        return {**super()._fingerprint(), "sampling": self.SAMPLING}

    def __iter__(self) -> Iterator[dict]:
        total = len(self)
        for number, indices in zip(range(self.position, total), self._sampler):
            batch = self._collate([self._items[k] for k in indices])
            if number + 1 == total:
                self.epoch, self.position = self.epoch + 1, 0
            else:
                self.position = number + 1
            yield batch


class DialogueDataModule(LightningDataModule):
    """Chat records (in memory) to training and validation batches; see the module docstring. `poisson`: training
    batches are Poisson samples (`PoissonBatches`, for DP-SGD; one process, no packing)."""

    def __init__(self, records: Iterable[dict] | Callable[[], Iterable[dict]], tokenizer, *, max_length: int,
                 batch_size: int, val_fraction: float, seed: int, packing: bool = False, num_workers: int = 0,
                 poisson: bool = False):
        super().__init__()
        if max_length < 2 or batch_size < 1:
            raise ValueError(f"max_length must be >= 2 and batch_size >= 1 (got {max_length}, {batch_size})")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        if num_workers != 0:
            raise ValueError("num_workers must be 0: batches are cut from in-memory arrays in the training process, "
                             "and worker processes would only copy the decrypted data into more processes")
        if poisson and packing:
            raise ValueError("Poisson sampling (DP-SGD) samples dialogues, and a packed row holds several: set "
                             "packing=False")
        check_chat_template(tokenizer)  # the text trained on is the text the model's own template serves
        self._records = records
        self._tokenizer = tokenizer
        self._max_length, self._batch_size, self._val_fraction = max_length, batch_size, val_fraction
        self._seed, self._packing, self._poisson = seed, packing, poisson
        self._train: TokenizedRecords | None = None
        self._val: TokenizedRecords | None = None
        self._counts: dict[str, int] = {}
        self._train_loader: Batches | None = None
        self._pending_state: dict | None = None

    def setup(self, stage: str | None = None) -> None:
        if self._train is not None:
            return
        records = self._records() if callable(self._records) else self._records
        data = tokenize_records(records, self._tokenizer, max_length=self._max_length)
        self._records = records = None  # the token arrays are all this module keeps
        n = len(data)
        check_dataset(n, int((data.lengths() > 0).sum()))  # a record without a doctor turn has no token
        n_val = round(self._val_fraction * n)
        if self._val_fraction > 0:
            n_val = min(max(n_val, 1), n - 1)
        order = np.random.default_rng(self._seed).permutation(n)
        supervised = data.supervised()
        val_idx, train_idx = order[:n_val], order[n_val:]
        self._val = data.select(val_idx[supervised[val_idx] > 0])
        self._train = data.select(train_idx[supervised[train_idx] > 0])
        data.wipe()  # the splits are copies
        if len(self._train) == 0:
            raise DataError("no training dialogue has a doctor turn left to learn from after the validation split and "
                            "the max_length cut: raise data.max_length or lower data.val_fraction")
        self._counts = {"n_records": n, "n_dropped": int((supervised == 0).sum()),
                        "n_truncated": int(data.truncated.sum())}

    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def _items(self, data: TokenizedRecords) -> list[np.ndarray]:
        if self._packing:
            return pack(data.lengths(), self._max_length, seed=self._seed)
        return [np.asarray([i]) for i in range(len(data))]

    def _batches(self, data: TokenizedRecords, *, shuffle: bool, world_size: int | None = None) -> Batches:
        if data is None:
            raise RuntimeError("call setup() before asking for a dataloader")
        rank, world_size = (0, world_size) if world_size else self._rank_world()
        return Batches(data, self._items(data), batch_size=self._batch_size, packed=self._packing,
                       pad_id=self._tokenizer.pad_token_id, seed=self._seed, shuffle=shuffle, rank=rank,
                       world_size=world_size)

    def _train_batches(self, world_size: int | None = None) -> Batches:
        if not self._poisson:
            return self._batches(self._train, shuffle=True, world_size=world_size)
        if self._train is None:
            raise RuntimeError("call setup() before asking for a dataloader")
        if (world_size or self._rank_world()[1]) != 1:
            raise ValueError("Poisson sampling (DP-SGD) draws every batch from the whole training split in one "
                             "process: run on one device (hardware.devices=1, hardware.num_nodes=1)")
        return PoissonBatches(self._train, batch_size=self._batch_size, pad_id=self._tokenizer.pad_token_id,
                              seed=self._seed)

    def train_dataloader(self) -> Batches:
        state = self._pending_state or (self._train_loader.state_dict() if self._train_loader is not None else None)
        self._train_loader = self._train_batches()
        if state:  # a new loader (e.g. dataloaders reloaded by Lightning) continues where the last one stopped
            self._train_loader.load_state_dict(state)
        self._pending_state = None
        return self._train_loader

    def val_dataloader(self) -> Batches:
        return self._batches(self._val, shuffle=False)

    def state_dict(self) -> dict:
        """The training data position (epoch, batches served) and the settings it is valid for."""
        if self._train_loader is not None:
            return self._train_loader.state_dict()
        return dict(self._pending_state or {})

    def load_state_dict(self, state_dict: dict) -> None:
        """Resume at a saved position; applied to the training loader now or when it is created."""
        if not state_dict:  # saved before any training batch was served
            return
        if self._train_loader is not None:
            self._train_loader.load_state_dict(state_dict)
        else:
            self._pending_state = dict(state_dict)

    def resume_problem(self, state: dict, *, world_size: int) -> str | None:
        """Why a saved training position cannot resume with this data on `world_size` processes, or None."""
        try:
            self._train_batches(world_size).load_state_dict(state)
        except ValueError as exc:  # medtee's own message: names settings, never data
            return str(exc)
        return None

    def training_split(self) -> TokenizedRecords:
        """The training split (after `setup`)."""
        if self._train is None:
            raise RuntimeError("training_split() needs setup() first")
        return self._train

    def held_out(self) -> TokenizedRecords:
        """The held-out split (after `setup`): the dialogues training never saw, by data.val_fraction and data.seed."""
        if self._val is None:
            raise RuntimeError("held_out() needs setup() first")
        return self._val

    def destroy(self) -> int:
        """Overwrite the token arrays with zeros and drop them (the end of a run); how many examples they held."""
        held = [d for d in (self._train, self._val) if d is not None]
        for data in held:
            data.wipe()
        self._train = self._val = self._train_loader = None
        return sum(len(d) for d in held)

    def stats(self) -> dict:
        """Aggregate counts only: n_train, n_val, train_tokens, supervised_tokens, and drop/cut counts."""
        if self._train is None:
            raise RuntimeError("call setup() before stats()")
        return {"n_train": len(self._train), "n_val": len(self._val), "train_tokens": int(len(self._train.input_ids)),
                "supervised_tokens": int((self._train.labels != IGNORE_INDEX).sum()), **self._counts}
