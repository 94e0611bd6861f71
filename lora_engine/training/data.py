"""Training data: JSONL manifests, several datasets with sampling weights, length-bucketed batches, and a
deterministic batch stream whose position is saved with each checkpoint so that a resumed run sees the same data.

The stream is global: every optimizer step takes `world_size` consecutive micro-batches per accumulation step and
rank r trains on the r-th. So N processes with batch B and accumulation A see exactly the batches that one process
with batch B and accumulation A*N sees, and their averaged gradients agree.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np


def load_manifest(path: str | Path) -> list[dict[str, Any]]:
    """One JSON object per non-blank line. Errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest {path} does not exist (expected a JSONL file, one example per line)")
    records = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg}); each line must be one JSON object") from e
        if not isinstance(rec, dict):
            raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
        records.append(rec)
    if not records:
        raise ValueError(f"manifest {path} has no examples")
    return records


@dataclasses.dataclass
class TrainData:
    """What a task hands to the loop: the datasets, how to batch them, and optionally how long each example is."""

    datasets: list[Sequence[Any]]
    collate: Callable[[list[Any]], Any]
    weights: list[float] | None = None        # sampling weight per dataset; None = each example once per epoch
    lengths: list[list[int]] | None = None    # per dataset, per example; enables length bucketing


Ref = tuple[int, int]  # (dataset index, example index)


def epoch_order(sizes: list[int], weights: list[float] | None, seed: int, epoch: int) -> list[Ref]:
    """The examples of one epoch, shuffled. An epoch has sum(sizes) examples; with weights, dataset i contributes
    a share proportional to weights[i], cycling through fresh permutations of it when it is small."""
    total = sum(sizes)
    if weights is None:
        counts = list(sizes)
    else:
        w = np.asarray(weights, dtype=np.float64)
        counts = [int(round(total * x)) for x in w / w.sum()]
    refs: list[Ref] = []
    for i, (size, count) in enumerate(zip(sizes, counts)):
        rng = np.random.default_rng([seed, epoch, i])
        reps = -(-count // size) if size else 0
        idx = np.concatenate([rng.permutation(size) for _ in range(reps)])[:count] if reps else []
        refs.extend((i, int(j)) for j in idx)
    perm = np.random.default_rng([seed, epoch, len(sizes)]).permutation(len(refs))
    return [refs[k] for k in perm]


def epoch_batches(order: list[Ref], batch_size: int, lengths: list[list[int]] | None, bucket_window: int,
                  seed: int, epoch: int) -> list[list[Ref]]:
    """Cut an epoch into full batches (the ragged tail is dropped). With lengths, each window of
    `bucket_window` batches is sorted by length first, so a batch pads little; the batches are then shuffled."""
    if lengths is not None and bucket_window > 1:
        window = batch_size * bucket_window
        bucketed: list[Ref] = []
        for start in range(0, len(order), window):
            chunk = order[start:start + window]
            bucketed.extend(sorted(chunk, key=lambda r: lengths[r[0]][r[1]]))
        order = bucketed
    batches = [order[i:i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)]
    perm = np.random.default_rng([seed, epoch, 1_000_003]).permutation(len(batches))
    return [batches[k] for k in perm]


class BatchStream:
    """An endless, reproducible sequence of micro-batches over epochs; `state_dict()` is the data position."""

    def __init__(self, data: TrainData, batch_size: int, seed: int, world_size: int = 1, rank: int = 0,
                 bucket_window: int = 50, length_bucketing: bool = True) -> None:
        self.data = data
        self.batch_size = batch_size
        self.seed = seed
        self.world_size = world_size
        self.rank = rank
        self.bucket_window = bucket_window if length_bucketing else 1
        self.sizes = [len(d) for d in data.datasets]
        if not self.sizes or sum(self.sizes) == 0:
            raise ValueError("no training examples: every dataset is empty")
        if data.weights is not None and len(data.weights) != len(self.sizes):
            raise ValueError(f"{len(data.weights)} sampling weights for {len(self.sizes)} datasets")
        if data.lengths is not None and [len(x) for x in data.lengths] != self.sizes:
            raise ValueError("TrainData.lengths must have one length per example of each dataset")
        self.epoch = 0
        self.offset = 0  # global micro-batches already taken from this epoch (all ranks together)
        self._batches = self._plan(0)
        if not self._batches:
            raise ValueError(f"an epoch has {sum(self.sizes)} examples, fewer than batch_size={batch_size}: "
                             "lower --batch-size or add data")

    def _plan(self, epoch: int) -> list[list[Ref]]:
        order = epoch_order(self.sizes, self.data.weights, self.seed, epoch)
        return epoch_batches(order, self.batch_size, self.data.lengths, self.bucket_window, self.seed, epoch)

    @property
    def batches_per_epoch(self) -> int:
        return len(self._plan(0)) if self.epoch else len(self._batches)

    def _take_global(self) -> list[Ref]:
        if self.offset >= len(self._batches):
            self.epoch += 1
            self.offset = 0
            self._batches = self._plan(self.epoch)
        refs = self._batches[self.offset]
        self.offset += 1
        return refs

    def next_refs(self) -> list[Ref]:
        """This rank's next micro-batch as (dataset, index) pairs; advances the global position by world_size."""
        mine: list[Ref] = []
        for r in range(self.world_size):
            refs = self._take_global()
            if r == self.rank:
                mine = refs
        return mine

    def next_batch(self) -> Any:
        return self.data.collate([self.data.datasets[d][i] for d, i in self.next_refs()])

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset, "seed": self.seed, "batch_size": self.batch_size,
                "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        # The plan depends on seed and per-process batch size only; the position is global, so it stays valid
        # when the number of processes changes.
        if state["seed"] != self.seed or state["batch_size"] != self.batch_size:
            raise ValueError(f"the checkpoint's data order (seed {state['seed']}, batch_size {state['batch_size']}) "
                             f"differs from this run's (seed {self.seed}, batch_size {self.batch_size}); "
                             "resume with the same --seed and --batch-size")
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])
        self._batches = self._plan(self.epoch)


def fixed_batches(examples: Sequence[Any], batch_size: int, world_size: int = 1, rank: int = 0) -> list[list[Any]]:
    """Validation batches in file order (the last one may be short); rank r gets batches r, r+W, r+2W, ..."""
    batches = [list(examples[i:i + batch_size]) for i in range(0, len(examples), batch_size)]
    return batches[rank::world_size]
