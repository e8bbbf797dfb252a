"""Per-sample randomness: a function of the seed only, restored global state, worker-independent."""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from conftest import task
from uniperceiver.config import DataSourceConfig
from uniperceiver.data import build_dataset, mix_seed, sample_rng, split_index


def test_sample_rng_seeds_and_restores() -> None:
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    before = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    with sample_rng(42):
        inside = (random.random(), np.random.rand(), torch.rand(1).item())
    after = (random.random(), np.random.rand(), torch.rand(1).item())
    assert after == before  # the outside streams continue as if nothing happened
    with sample_rng(42):
        assert (random.random(), np.random.rand(), torch.rand(1).item()) == inside
    with sample_rng(None):  # no seed: generators untouched
        pass


def test_mix_seed_and_split_index() -> None:
    assert mix_seed(0, 5, 3, bits=32) == mix_seed(0, 5, 3, bits=32) != mix_seed(0, 3, 5, bits=32)
    assert split_index((4, 99)) == (4, 99)
    assert split_index(4) == (4, mix_seed(4, bits=32))
    # The numbers of the two mixers it replaced (data.rng.derive_seed: 32 bits, engine.sampler.mix_seed:
    # 63 bits), so sample seeds, task draws and resumed runs stay bit-identical.
    assert mix_seed(0, 5, 3, bits=32) == 3716799053 and mix_seed(4, bits=32) == 1490961094
    assert mix_seed(1, 0x7A5C, 0, 5) == 2416870116453235506 and mix_seed(7, 0x5EED, 2, 1, 9) == 6125840649551202109
    assert mix_seed(-1) == mix_seed((1 << 63) - 1)  # parts are taken modulo 2**63, as the sampler did


def _imagenet_train(imagenet_tree: Path, tok):
    t = task("image_classification")
    t.train_data = DataSourceConfig(format="imagenet", root=str(imagenet_tree))
    return build_dataset(t, "train", tok)


def test_augmentation_depends_only_on_seed(imagenet_tree: Path, tok) -> None:
    ds = _imagenet_train(imagenet_tree, tok)
    a = ds[(0, 7)]["image"]
    torch.rand(100), random.random(), np.random.rand()  # disturb the global streams
    ds[(1, 8)]
    b = ds[(0, 7)]["image"]
    assert torch.equal(a, b)
    # another seed gives another augmentation (RandAugment, crop, erasing)
    assert any(not torch.equal(a, ds[(0, s)]["image"]) for s in range(8, 12))


def test_same_samples_with_and_without_workers(imagenet_tree: Path, tok) -> None:
    ds = _imagenet_train(imagenet_tree, tok)
    order = [(i % 2, mix_seed(0, i, bits=32)) for i in range(6)]

    def run(workers: int) -> torch.Tensor:
        loader = DataLoader(ds, batch_size=3, sampler=order, num_workers=workers,
                            collate_fn=lambda b: torch.stack([s["image"] for s in b]),
                            multiprocessing_context="fork" if workers else None)
        return torch.cat(list(loader))

    assert torch.equal(run(0), run(2))
