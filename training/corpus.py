"""`coexit build-corpus`: a reproducible, offline-buildable corpus of real Python source.

Sources: the running interpreter's standard library (test packages excluded) and a pinned list of pure-Python
PyPI packages that pip fetches at exact versions as wheels (no model hubs, no web). Each stdlib top-level module
and each PyPI distribution is one *package*; the held-out split takes whole packages (chosen by a seeded hash),
so no held-out package is ever seen in training. Output: OUT/train.jsonl and OUT/heldout.jsonl, one
{"package", "path", "text"} record per file, plus OUT/manifest.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import sysconfig
import tempfile
import zipfile
from pathlib import Path

from tqdm import tqdm

# Pure-Python wheels at exact versions (py3-none-any), fetched with `pip download --no-deps`.
PYPI_PINS = [
    "requests==2.32.3", "six==1.16.0", "attrs==24.2.0", "click==8.1.7", "jinja2==3.1.4", "packaging==24.1",
    "pyparsing==3.1.4", "python-dateutil==2.9.0.post0", "tqdm==4.66.5", "rich==13.8.1", "pygments==2.18.0",
    "docutils==0.21.2", "flask==3.0.3", "werkzeug==3.0.4", "itsdangerous==2.2.0", "idna==3.10",
    "urllib3==2.2.3", "toolz==0.12.1", "more-itertools==10.5.0", "sqlparse==0.5.1", "boltons==24.0.0",
    "typing_extensions==4.12.2", "tomli==2.0.1", "chardet==5.2.0", "pytz==2024.2", "networkx==3.3",
]
EXCLUDED_STDLIB = {"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "__pycache__",
                   "turtledemo", "ensurepip", "pydoc_data", "config-3", "tkinter"}
MAX_FILE_BYTES = 400_000


def is_heldout(package: str, seed: int, fraction: float) -> bool:
    h = int(hashlib.sha256(f"{seed}:{package}".encode()).hexdigest()[:8], 16)
    return h / 0xFFFFFFFF < fraction


def stdlib_files() -> list[tuple[str, str, Path]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root)
        if any(part in EXCLUDED_STDLIB or part.startswith("config-") for part in rel.parts):
            continue
        if any(part.startswith("test") for part in rel.parts[:-1]) or rel.name.startswith("test_"):
            continue
        package = rel.parts[0].removesuffix(".py")
        out.append((f"stdlib:{package}", f"stdlib/{rel}", p))
    return out


def fetch_wheels(pins: list[str], dest: Path) -> list[Path]:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-q", "-d", str(dest),
           *pins]
    subprocess.run(cmd, check=True)
    return sorted(dest.glob("*.whl"))


def wheel_files(wheel: Path) -> list[tuple[str, str, bytes]]:
    dist = wheel.name.split("-")[0].lower().replace("_", "-")
    with zipfile.ZipFile(wheel) as z:
        return [(f"pypi:{dist}", f"pypi/{dist}/{n}", z.read(n)) for n in sorted(z.namelist())
                if n.endswith(".py") and "/tests/" not in f"/{n}" and "/test/" not in f"/{n}"]


def build(out: Path, seed: int = 0, heldout_fraction: float = 0.08, pins: list[str] | None = None,
          wheel_dir: Path | None = None) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    records: list[tuple[str, str, str]] = []
    for package, path, file in tqdm(stdlib_files(), desc="stdlib", unit="file"):
        data = file.read_bytes()
        if len(data) <= MAX_FILE_BYTES:
            records.append((package, path, data.decode("utf-8", errors="replace")))
    with tempfile.TemporaryDirectory() as tmp:
        wheels = fetch_wheels(pins if pins is not None else PYPI_PINS, wheel_dir or Path(tmp)) if (
            pins is None or pins) else []
        for wheel in tqdm(wheels, desc="pypi wheels", unit="wheel"):
            for package, path, data in wheel_files(wheel):
                if len(data) <= MAX_FILE_BYTES:
                    records.append((package, path, data.decode("utf-8", errors="replace")))
    packages = sorted({r[0] for r in records})
    heldout = {p for p in packages if is_heldout(p, seed, heldout_fraction)}
    counts = {"train": [0, 0], "heldout": [0, 0]}
    with open(out / "train.jsonl", "w") as ftrain, open(out / "heldout.jsonl", "w") as fheld:
        for package, path, text in records:
            split = "heldout" if package in heldout else "train"
            (fheld if split == "heldout" else ftrain).write(json.dumps(
                {"package": package, "path": path, "text": text}) + "\n")
            counts[split][0] += 1
            counts[split][1] += len(text)
    manifest = {"seed": seed, "heldout_fraction": heldout_fraction, "python": sys.version.split()[0],
                "pins": pins if pins is not None else PYPI_PINS, "heldout_packages": sorted(heldout),
                "train_packages": len(packages) - len(heldout),
                "files": {k: v[0] for k, v in counts.items()}, "chars": {k: v[1] for k, v in counts.items()}}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="coexit build-corpus", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="data/corpus")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--heldout-fraction", type=float, default=0.08)
    ap.add_argument("--no-pypi", action="store_true", help="stdlib only (no package downloads)")
    args = ap.parse_args(argv)
    m = build(Path(args.out), args.seed, args.heldout_fraction, [] if args.no_pypi else None)
    print(f"train: {m['files']['train']} files, {m['chars']['train'] / 1e6:.1f} M chars; held out: "
          f"{m['files']['heldout']} files, {m['chars']['heldout'] / 1e6:.1f} M chars from "
          f"{len(m['heldout_packages'])} packages -> {args.out}")
    return 0
