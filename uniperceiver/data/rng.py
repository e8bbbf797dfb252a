"""Per-sample randomness that survives resumption and does not depend on num_workers.

In training the engine indexes a dataset with `(index, seed)`; `__getitem__` runs every random
choice of that sample (crops, flips, RandAugment, masking, frame starts, synonyms) inside
`sample_rng(seed)`. The seed is a pure function of (run seed, step, position in the batch), so a
resumed run, or the same run with another number of workers, sees bit-identical samples.

timm and torchvision draw from the *global* python / numpy / torch CPU generators, so the context
manager seeds those and restores their previous state on exit: code outside the sample (the
training loop, dropout) is unaffected. CUDA generators are never touched.
"""
from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

__all__ = ["mix_seed", "sample_rng", "split_index"]


_MASK63 = (1 << 63) - 1


def mix_seed(*parts: int, bits: int = 63) -> int:
    """A well-spread seed of `bits` bits from integers (run seed, a purpose tag, step, rank, ...;
    order matters), by numpy's SeedSequence hashing. The one seed mixer of the project: the task
    sampler and streams use 63 bits, sample seeds 32 (numpy's legacy seeding takes 32). The low 32
    bits of the 63-bit value are the 32-bit one, so both are the same hash."""
    if not 1 <= bits <= 63:
        raise ValueError(f"bits must be in [1, 63], got {bits}")
    word = np.random.SeedSequence([int(p) & _MASK63 for p in parts]).generate_state(1, np.uint64)[0]
    return int(word) & ((1 << bits) - 1)


@contextmanager
def sample_rng(seed: int | None) -> Iterator[None]:
    """Seed python `random`, numpy and the torch CPU generator from `seed`; restore them on exit.

    `seed=None` leaves the generators alone (deterministic code needs no seeding).
    """
    if seed is None:
        yield
        return
    py_state = random.getstate()
    np_state = np.random.get_state()
    torch_state = torch.random.get_rng_state()
    seed = int(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    # Only the CPU generator: torch.manual_seed would also reseed every CUDA device.
    torch.random.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.random.set_rng_state(torch_state)


def split_index(index: int | tuple[int, int]) -> tuple[int, int]:
    """`(index, seed)` from a training index tuple or a plain int.

    A plain int (evaluation) gets a seed derived from the index, so whatever randomness a sample
    needs even in evaluation (MLM masking) is fixed per sample.
    """
    if isinstance(index, (tuple, list)):
        if len(index) != 2:
            raise TypeError(f"a dataset index is an int or (index, seed), got {index!r}")
        idx, seed = int(index[0]), int(index[1])
        return idx, seed
    if isinstance(index, torch.Tensor):
        index = int(index)
    idx = int(index)
    return idx, mix_seed(idx, bits=32)
