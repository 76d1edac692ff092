"""Shared fixtures: tiny random checkpoint directories written once per test session."""

from __future__ import annotations

import pytest
import torch

from coexit.tiny import make_checkpoint

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("tiny"), "tiny", seed=0)


@pytest.fixture(scope="session")
def checkpoint_factory(tmp_path_factory):
    made = {}

    def make(flavour: str = "tiny", seed: int = 0):
        key = (flavour, seed)
        if key not in made:
            made[key] = make_checkpoint(tmp_path_factory.mktemp(f"{flavour}-{seed}"), flavour, seed)
        return made[key]

    return make


@pytest.fixture(scope="session")
def split_dir(tmp_path_factory):
    """tiny checkpoints that differ only in the split layer: split_dir(s)."""
    from coexit.config import Config

    made = {}

    def make(split: int = 3):
        if split not in made:
            cfg = Config.flavour("tiny").with_exits((2, 3, 4), split, True, (0.3, 0.3, 0.3, 1.0))
            made[split] = make_checkpoint(tmp_path_factory.mktemp(f"split{split}"), cfg, seed=0)
        return made[split]

    return make


@pytest.fixture(scope="module")
def served(tiny_dir):
    """A real cloud server on a free loopback port, holding the whole tiny model."""
    import coexit
    from cloud.server import ServerThread

    with ServerThread(coexit.load(tiny_dir)) as srv:
        yield srv
