"""The corpus builder: held-out packages never appear in training, and the build is deterministic."""

from __future__ import annotations

import json
import zipfile

from training.corpus import build, wheel_files


def _packages(path):
    return {json.loads(line)["package"] for line in path.read_text().splitlines()}


def test_heldout_split_is_by_whole_package_and_deterministic(tmp_path):
    m1 = build(tmp_path / "a", seed=3, heldout_fraction=0.1, pins=[])
    m2 = build(tmp_path / "b", seed=3, heldout_fraction=0.1, pins=[])
    for name in ("train.jsonl", "heldout.jsonl", "manifest.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    train, held = _packages(tmp_path / "a" / "train.jsonl"), _packages(tmp_path / "a" / "heldout.jsonl")
    assert held and train and not (train & held)
    assert held == set(m1["heldout_packages"]) and m1 == m2
    paths = [json.loads(line)["path"] for line in (tmp_path / "a" / "train.jsonl").read_text().splitlines()]
    assert not any("/test/" in p or "/tests/" in p or p.split("/")[-1].startswith("test_") for p in paths)
    other = build(tmp_path / "c", seed=4, heldout_fraction=0.1, pins=[])
    assert set(other["heldout_packages"]) != set(m1["heldout_packages"])


def test_wheel_files_skip_tests(tmp_path):
    wheel = tmp_path / "demo_pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("demo_pkg/__init__.py", "x = 1\n")
        z.writestr("demo_pkg/tests/test_x.py", "assert True\n")
        z.writestr("demo_pkg-1.0.dist-info/METADATA", "Name: demo-pkg\n")
    assert [(p, path) for p, path, _ in wheel_files(wheel)] == [("pypi:demo-pkg", "pypi/demo-pkg/demo_pkg/__init__.py")]


def test_presets_pin_each_package_once_at_an_exact_version():
    from training.corpus import PRESETS

    for name, pins in PRESETS.items():
        names = [p.split("==")[0].lower().replace("_", "-") for p in pins]
        assert all(p.count("==") == 1 and p.split("==")[1] for p in pins), name
        assert len(names) == len(set(names)), f"{name}: a package pinned twice"
    assert set(PRESETS["small"]) < set(PRESETS["large"]) and len(PRESETS["large"]) >= 120
