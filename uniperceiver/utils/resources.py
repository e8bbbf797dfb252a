"""Files that ship inside the package: the run configs and the demo data.

`uniperceiver/configs` is a link to the top-level `configs/` folder (the one source of the configs):
a source checkout or an editable install reads them through the link, and a wheel carries them as
plain files (setup.cfg's package_data), so `python -m uniperceiver.eval zeroshot/imagenet1k` works in
any directory. Only the standard library here: the config layer imports this module.
"""
from __future__ import annotations

import os
from pathlib import Path

__all__ = ["config_dir", "demo_data_dir", "find_config"]

_PACKAGE_DIR = Path(__file__).resolve().parents[1]


def config_dir() -> Path:
    """The packaged configs folder (`uniperceiver/configs`)."""
    return _PACKAGE_DIR / "configs"


def demo_data_dir() -> Path:
    """The packaged demo data folder (`uniperceiver/demo/data`)."""
    return _PACKAGE_DIR / "demo" / "data"


def find_config(name: str | os.PathLike) -> str:
    """The config file `name` names: a file path as given (absolute or relative to the working
    directory), else a packaged config by its short name, with or without `.yaml`
    (`zeroshot/imagenet1k`, `configs/zeroshot/imagenet1k.yaml`). An unknown name is returned
    unchanged, so the caller reports it as not found."""
    path = os.fspath(name)
    if os.path.isfile(path):
        return path
    short = Path(path)
    if short.is_absolute():
        return path
    if short.parts[:1] == ("configs",):  # the README's source-checkout spelling, from elsewhere
        short = Path(*short.parts[1:]) if len(short.parts) > 1 else short
    for candidate in (short, short.with_name(short.name + ".yaml")):
        packaged = config_dir() / candidate
        if packaged.is_file():
            return str(packaged)
    return path
