"""The run's seed and the seeds derived from it, in one place.

Every random stream of a run starts from the one ``seed_everything`` of the CLI (``PL_GLOBAL_SEED``), read by
:func:`run_seed`; :func:`mix_seed` derives independent 32-bit seeds from it and a few tags (the sampler's epochs,
batches and ranks). Two older derivations keep their own formulas because changing them would change every
trained number and the committed fixtures: GM-Coord's noise (:func:`umd_lightning.callbacks.gm_coord.noise_generator`,
``seed * 2654435761 + step``) and the text-masking collate's per-batch seed (``seed << 32`` plus a CRC32 of the
batch's ids and texts); the synthetic generator seeds numpy with ``[seed, crc32(layout)]``.
"""

from __future__ import annotations

import hashlib
import os

SEED_ENV = "PL_GLOBAL_SEED"
"""The variable ``seed_everything`` sets in this process and its DDP workers."""


def mix_seed(*values: int | str) -> int:
    """A 32-bit seed from several integers (or tags): distinct inputs give unrelated seeds.

    32 bits because torch's CPU generator (mt19937) keeps only the low 32 bits of a seed.
    """
    digest = hashlib.blake2b(repr(values).encode("utf-8"), digest_size=4).digest()
    return int.from_bytes(digest, "little")


def global_seed() -> int | None:
    """The run's seed (``PL_GLOBAL_SEED``), or ``None`` when nothing set it."""
    seed = os.environ.get(SEED_ENV)
    return int(seed) if seed is not None else None


def run_seed(seed: int | None = None) -> int:
    """``seed`` when given, else the run's seed: ``PL_GLOBAL_SEED``, which ``seed_everything`` (the CLI's
    ``seed_everything:``) sets in this process and its DDP workers; 0 when nothing set it.

    The DataModules resolve their ``seed: None`` through this, so one ``seed_everything`` drives the data order,
    the augmentation, the text and patch masks and the ITM / retrieval negatives; GM-Coord's noise too."""
    if seed is not None:
        return int(seed)
    found = global_seed()
    return 0 if found is None else found
