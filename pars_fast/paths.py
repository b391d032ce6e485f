"""Where pars_fast keeps its files: $PARS_FAST_HOME (default ~/.cache/pars_fast)."""

import os
from pathlib import Path


def home() -> Path:
    return Path(os.environ.get("PARS_FAST_HOME", Path.home() / ".cache" / "pars_fast")).expanduser()


def default_ranker_dir() -> Path:
    return home() / "rankers" / "default"
