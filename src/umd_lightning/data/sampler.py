"""Training loaders that resume mid-epoch exactly where a killed run stopped.

Lightning 2.6 saves the state of a training ``DataLoader`` that has ``state_dict()`` / ``load_state_dict()``
(its ``_Stateful`` check) in every checkpoint, and hands it back before the resumed run iterates; a plain
``DataLoader`` restarts the epoch from its first batch with a new shuffle. :class:`ResumableDataLoader` supplies
that state, and three choices make the resumed run repeat the uninterrupted one:

* **order**: :class:`ResumableSampler` draws each epoch's permutation from ``(seed, epoch)`` (not from the global
  RNG), so a resumed run knows the order, and skips the indices of the batches already trained on without
  loading them;
* **per-step randomness**: before fetching batch ``i`` of epoch ``e`` the loader seeds torch's global RNG from
  ``(seed, epoch, i, rank)``, so what draws from it between two fetches (the training transform's crop when
  loading in the main process, dropout, ITM swaps, patch masks) depends on the step, not on the process's
  history;
* **collate randomness**: a collate function with ``state_dict()`` / ``load_state_dict()`` (the text-masking
  ``PretrainCollator``) is saved with the loader when it runs in the main process (``num_workers=0``).

With ``num_workers > 0`` the order, the skip and the per-step seeding still hold, but the transform and
collate draws happen in worker processes whose RNG streams restart with the resumed iterator, so a resumed
run is statistically, not bitwise, the same. Worker seeds come from ``(seed, epoch)``, not from the global RNG.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Sized
from typing import Any

import torch
import torch.distributed as dist
from lightning.fabric.utilities.seed import pl_worker_init_function
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from umd_lightning.errors import check_range
from umd_lightning.seeds import mix_seed


class ResumableSampler(DistributedSampler):
    """Seeded per-epoch shuffling, split across distributed ranks, that can start an epoch part-way.

    A ``DistributedSampler`` (so Lightning keeps it rather than injecting its own under DDP): epoch ``e`` is the
    permutation of ``torch.randperm`` seeded with ``seed + e``, padded to a multiple of the world size and dealt
    round-robin to the ranks. The world size and rank come from ``torch.distributed`` when it is initialised,
    else 1 and 0.

    Args:
        dataset: anything with ``len()``.
        seed: seed of the permutations (same on every rank).
        shuffle: ``False`` keeps the dataset order.
        drop_last: drop the tail that does not divide by the world size instead of padding with repeats.
    """

    def __init__(self, dataset: Sized, seed: int = 0, shuffle: bool = True, drop_last: bool = False) -> None:
        distributed = dist.is_available() and dist.is_initialized()
        super().__init__(
            dataset,  # type: ignore[arg-type]  # only len() is used
            num_replicas=dist.get_world_size() if distributed else 1,
            rank=dist.get_rank() if distributed else 0,
            shuffle=shuffle,
            seed=seed,
            drop_last=drop_last,
        )
        self._skip = 0

    def skip_next(self, count: int) -> None:
        """Leave out the first ``count`` indices of the next iteration only (the samples already trained on)."""
        if count < 0:
            raise ValueError(f"cannot skip {count} indices")
        self._skip = count

    def __iter__(self) -> Iterator[int]:
        skip, self._skip = self._skip, 0
        indices = list(super().__iter__())
        return iter(indices[skip:])


class ResumableDataLoader(DataLoader):
    """A training ``DataLoader`` whose position within the epoch is saved in Lightning checkpoints.

    It takes ``DataLoader``'s arguments (``sampler`` and ``generator`` excepted: it makes its own) plus ``seed``,
    and always iterates a :class:`ResumableSampler`. ``len()`` is the whole epoch's length even right after a
    resume, as Lightning counts the batches already done against it. See the module docstring for what is
    reproduced exactly.

    Args:
        dataset: the training dataset.
        batch_size: samples per batch.
        shuffle: shuffle per epoch (seeded); ``False`` keeps the order.
        seed: seed of the shuffles, of the per-step global RNG seeding and of the worker seeds.
        reseed_global_rng: seed torch's global RNG before every batch (see the module docstring).
        **kwargs: any other ``DataLoader`` argument (``num_workers``, ``collate_fn``, ``drop_last``, ...).
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int = 1,
        shuffle: bool = True,
        seed: int = 0,
        reseed_global_rng: bool = True,
        **kwargs: Any,
    ) -> None:
        # Lightning re-instantiates loaders with a `sampler` of its own only for cases (prediction, overfitting
        # a few batches) that do not resume a fit; accept it there, but then the loader cannot skip.
        sampler = kwargs.pop("sampler", None) or ResumableSampler(dataset, seed=seed, shuffle=shuffle)
        kwargs.pop("generator", None)
        super().__init__(dataset, batch_size=batch_size, sampler=sampler, generator=torch.Generator(), **kwargs)
        self.seed = seed
        self.reseed_global_rng = reseed_global_rng
        self._epoch = 0
        self._batches = 0
        self._pending: dict[str, Any] | None = None

    def _collate_is_stateful(self) -> bool:
        collate = self.collate_fn
        return self.num_workers == 0 and hasattr(collate, "state_dict") and hasattr(collate, "load_state_dict")

    def state_dict(self) -> dict[str, Any]:
        """``{"epoch", "batches", "collate"}``: the epoch being iterated, the batches of it handed out so far, and
        the main-process collate function's state (``None`` with worker processes)."""
        return {
            "epoch": self._epoch,
            "batches": self._batches,
            "collate": self.collate_fn.state_dict() if self._collate_is_stateful() else None,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`; applied when the next iteration starts, once the epoch is known.

        Raises:
            TypeError: the loader's sampler was replaced by one that cannot skip.
        """
        if not isinstance(self.sampler, ResumableSampler):
            raise TypeError(f"cannot resume a loader whose sampler is a {type(self.sampler).__name__}")
        self._pending = dict(state_dict)

    def __iter__(self) -> Iterator[Any]:
        # A generator, so nothing below runs before the first `next()`: Lightning creates the iterator before it
        # calls `set_epoch` on the sampler of a resumed run.
        epoch = int(getattr(self.sampler, "epoch", 0))
        rank = int(getattr(self.sampler, "rank", 0))
        done = 0
        if self._pending is not None:
            pending, self._pending = self._pending, None
            # A checkpoint taken after an epoch's last batch resumes at the start of the next epoch.
            if pending["epoch"] == epoch:
                done = int(pending["batches"])
                self.sampler.skip_next(done * self.batch_size)
            if pending.get("collate") is not None and self._collate_is_stateful():
                self.collate_fn.load_state_dict(pending["collate"])
        self.generator.manual_seed(mix_seed(self.seed, epoch, "workers"))
        self._epoch, self._batches = epoch, done
        batches = super().__iter__()
        while True:
            if self.reseed_global_rng:
                torch.manual_seed(mix_seed(self.seed, epoch, self._batches, rank))
            try:
                batch = next(batches)
            except StopIteration:
                return
            self._batches += 1
            yield batch


class EvaluationSampler(DistributedSampler):
    """An evaluation split dealt round-robin to the ranks without repeats, so a metric counts every sample once
    (Lightning's own sampler pads the ranks to equal length with repeated samples: VQA-RAD's 451 test questions
    became 452 on 2 ranks). Ranks may then hold one sample more or less.

    A split smaller than the number of ranks is padded instead (every rank must run at least one batch, or the
    ranks' end-of-epoch metric reductions would not match), with a warning that some samples count twice.
    """

    def __init__(self, dataset: Sized) -> None:
        super().__init__(dataset, shuffle=False)  # type: ignore[arg-type]  # only len() is used
        self.unpadded = len(dataset) >= self.num_replicas
        if self.unpadded:
            self.num_samples = len(range(self.rank, len(dataset), self.num_replicas))
            self.total_size = len(dataset)
        elif self.rank == 0:
            warnings.warn(
                f"an evaluation split of {len(dataset)} samples on {self.num_replicas} processes: some samples are "
                "scored twice (every process needs one)",
                stacklevel=2,
            )

    def __iter__(self) -> Iterator[int]:
        if self.unpadded:
            return iter(range(self.rank, self.total_size, self.num_replicas))
        return super().__iter__()


def worker_init(worker_id: int) -> None:
    """DataLoader workers leave the main process's process group: a scheduler's pre-emption or a Ctrl-C signals the
    whole group, and a worker killed by it would crash the run before the main process reaches its checkpoint at
    the step boundary (the main process stops its workers itself, and a worker exits when its parent dies). The
    signals' default actions stay, so an explicit terminate still ends a worker. Then Lightning's worker seeding,
    as it would have added it."""
    os.setpgrp()
    if int(os.environ.get("PL_SEED_WORKERS", 0)):
        pl_worker_init_function(worker_id)


def make_loader(dataset: Dataset, *, train: bool, seed: int, **kwargs: Any) -> DataLoader:
    """The DataModules' loader: a shuffled :class:`ResumableDataLoader` for training, else a ``DataLoader`` in
    dataset order.

    Under DDP an evaluation loader deals the split to the ranks without padding (:class:`EvaluationSampler`):
    every sample is scored once, whatever the number of ranks.

    Args:
        dataset: the split.
        train: training split or evaluation split.
        seed: the data module's seed (training only).
        **kwargs: ``DataLoader`` arguments (not ``shuffle``).
    """
    if kwargs.get("num_workers", 0) > 0:
        kwargs.setdefault("worker_init_fn", worker_init)
    if train:
        return ResumableDataLoader(dataset, shuffle=True, seed=seed, **kwargs)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        kwargs["sampler"] = EvaluationSampler(dataset)  # type: ignore[arg-type]
    return DataLoader(dataset, shuffle=False, **kwargs)


def check_loader_options(
    batch_size: int, num_workers: int, max_text_length: int, mask_ratio_text: float, image_size: int
) -> None:
    """The DataModule options every loader needs, each checked with one line naming it and its valid range."""
    check_range("data.init_args.batch_size", batch_size, low=1)
    check_range("data.init_args.num_workers", num_workers, low=0)
    check_range("data.init_args.max_text_length", max_text_length, low=3)  # room for the special tokens
    check_range("data.init_args.mask_ratio_text", mask_ratio_text, low=0.0, high=1.0)
    check_range("data.init_args.image_size", image_size, low=1)
