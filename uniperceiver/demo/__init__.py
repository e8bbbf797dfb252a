"""The offline demo: a tiny Uni-Perceiver-MoE trained on embedded data (emoji, Fashion-MNIST,
WordNet glosses) and evaluated zero-shot on held-out emoji.

The data, its split rules and class names: `uniperceiver.demo.data_files`; how it was made:
`uniperceiver.demo.prepare`; the torch dataset: `uniperceiver.data.datasets.demo`.
"""
from .data_files import (
    class_names_path,
    demo_class_names,
    demo_data_dir,
    emoji_subset_indices,
    is_heldout_subgroup,
    is_test_row,
    load_emoji,
    load_fashion_mnist,
    load_wordnet,
)

__all__ = [
    "class_names_path",
    "demo_class_names",
    "demo_data_dir",
    "emoji_subset_indices",
    "is_heldout_subgroup",
    "is_test_row",
    "load_emoji",
    "load_fashion_mnist",
    "load_wordnet",
]
