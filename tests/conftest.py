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
