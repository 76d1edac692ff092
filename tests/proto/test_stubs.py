"""The committed stubs in coexit/v1/ are what `python -m proto.gen` produces from proto/ today."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("grpc_tools")

from proto.gen import ROOT, generate  # noqa: E402


def test_committed_stubs_are_fresh(tmp_path):
    fresh = generate(tmp_path)
    assert fresh, "protoc produced nothing"
    for f in fresh:
        committed = ROOT / "coexit" / "v1" / f.name
        assert committed.is_file(), f"{committed} is missing: run `python -m proto.gen`"
        assert committed.read_bytes() == f.read_bytes(), f"{committed} is stale: run `python -m proto.gen`"
    assert Path(ROOT / "proto" / "coexit" / "v1" / "coexit.proto").is_file()
