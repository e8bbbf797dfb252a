"""The offline demo command (`python -m uniperceiver.demo`): a tiny Uni-Perceiver-MoE trained on
embedded data (emoji, Fashion-MNIST, WordNet glosses) and evaluated zero-shot on held-out emoji.

The data ships in `uniperceiver/demo/data/`; its layout, split rules and class names:
`uniperceiver.data.demo_files`; the torch dataset: `uniperceiver.data.datasets.demo`; how the
files were made: the maintainer script `uniperceiver/tools/maintainer/prepare_demo_data.py`.
"""
