"""Benchmarks (not tests): each script prints its figures, compared against a baseline in the same run."""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def shown(path, fallback: str | None = None) -> str:
    """A path as results print it: relative to the repository when inside it, else `fallback` (e.g. "a tiny random
    checkpoint" for a temporary folder) or the bare name, so that no result names a machine's own folders."""
    p = Path(path).resolve()
    try:
        return str(p.relative_to(ROOT))
    except ValueError:
        return fallback or p.name
