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
# The large preset (#13: a corpus of 60 M+ tokens): the pins above plus 101 more widely used pure-Python wheels,
# each pinned exactly (py3-none-any, so the build is the same on any machine). Whole packages are held out as
# before; `ansible` (164 MB of collection modules) is left out so no single package dominates.
LARGE_EXTRA_PINS = [
    "CherryPy==18.10.0", "accelerate==1.15.0", "aiobotocore==3.10.0", "alembic==1.20.1", "ansible_core==2.19.14",
    "anyio==4.16.0", "arrow==1.4.0", "astroid==4.3.4", "azure_core==1.41.0", "azure_mgmt_compute==39.0.0",
    "babel==2.18.0", "beautifulsoup4==4.15.0", "bokeh==3.9.2", "boto3==1.44.8", "botocore==1.44.8", "bottle==0.13.4",
    "cattrs==26.2.1", "celery==5.7.0", "cleo==2.1.0", "dash==4.4.1", "dask==2026.8.0", "datasets==5.2.0",
    "distributed==2026.8.0", "django==5.2.19", "fabric==3.2.3", "faker==40.63.0", "fastapi==0.165.0",
    "flake8==7.5.0", "fsspec==2026.9.0", "google_api_core==2.44.0", "google_cloud_bigquery==3.47.0",
    "hatchling==1.33.0", "html5lib==1.1", "httpx==0.28.1", "huggingface_hub==2.4.0", "hvac==2.4.0", "invoke==3.0.3",
    "ipython==9.18.1", "jedi==0.20.1", "jsonschema==4.26.0", "jupyter_client==8.10.0", "kombu==5.7.0",
    "kubernetes==37.0.2", "langchain_core==1.8.4", "ldap3==2.9.1", "mako==1.4.3", "markdown==3.11.3",
    "marshmallow==4.4.0", "mkdocs==1.6.1", "moto==5.2.5", "mpmath==1.4.1", "nbconvert==7.17.2", "nbformat==5.11.1",
    "nltk==3.10.4", "openai==3.57.0", "openpyxl==3.1.5", "paramiko==5.1.0", "parso==0.8.7", "pdm==2.29.4",
    "peft==0.21.2", "pexpect==4.9.0", "pipenv==2026.10.3", "plotly==7.1.0", "poetry==2.5.1", "poetry_core==2.5.0",
    "prompt_toolkit==3.0.53", "pyasn1_modules==0.4.2", "pycodestyle==2.15.0", "pycparser==3.12", "pydantic==2.14.4",
    "pyflakes==4.1.0", "pylint==4.1.4", "pyramid==2.1", "pysnmp==7.1.30", "pytest==9.2.0", "referencing==0.37.0",
    "responses==0.26.3", "rich_click==1.9.9", "ruamel_yaml==0.19.1", "s3transfer==0.19.3", "scapy==2.8.0",
    "scrapy==2.19.0", "seaborn==0.13.2", "selenium==4.52.0", "sentry_sdk==2.75.0", "setuptools==84.2.1",
    "sphinx==9.0.4", "sqlglot==30.30.0", "starlette==1.10.0", "sympy==1.14.0", "textual==8.2.8", "tomlkit==0.15.2",
    "tox==4.67.15", "traitlets==5.16.1", "transformers==5.24.0", "trio==0.35.0", "twisted==26.10.0", "typer==0.29.2",
    "virtualenv==21.15.11", "xarray==2026.9.0",
]
PRESETS = {"small": PYPI_PINS, "large": PYPI_PINS + LARGE_EXTRA_PINS}
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
    from coexit.cli import HelpFormatter

    ap = argparse.ArgumentParser(prog="coexit build-corpus", description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--out", default="data/corpus", help="output directory (train.jsonl, heldout.jsonl)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the held-out package split")
    ap.add_argument("--heldout-fraction", type=float, default=0.08, help="share of packages held out")
    ap.add_argument("--no-pypi", action="store_true", help="stdlib only (no package downloads)")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="small",
                    help="small: the stdlib and 30-odd pinned wheels (27 M chars); large: 101 more packages "
                         "(about 300 M chars, 80 M tokens), the corpus the bundled model was trained on")
    args = ap.parse_args(argv)
    m = build(Path(args.out), args.seed, args.heldout_fraction, [] if args.no_pypi else list(PRESETS[args.preset]))
    print(f"train: {m['files']['train']} files, {m['chars']['train'] / 1e6:.1f} M chars; held out: "
          f"{m['files']['heldout']} files, {m['chars']['heldout'] / 1e6:.1f} M chars from "
          f"{len(m['heldout_packages'])} packages -> {args.out}")
    return 0
