"""Generate the Python stubs for proto/coexit/v1/*.proto into coexit/v1/ (run: python -m proto.gen).

The stubs are committed so that users need no build step; tests/proto/test_stubs.py regenerates them into a
temporary directory and fails when the committed files are stale.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"


def generate(out_dir: Path) -> list[Path]:
    from grpc_tools import protoc  # dev extra

    protos = sorted(str(p.relative_to(PROTO_DIR)) for p in (PROTO_DIR / "coexit").rglob("*.proto"))
    args = ["protoc", f"-I{PROTO_DIR}", f"--python_out={out_dir}", f"--grpc_python_out={out_dir}",
            f"--pyi_out={out_dir}", *protos]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed for {protos}")
    return sorted((out_dir / "coexit" / "v1").glob("*_pb2*.py*"))


def main() -> int:
    files = generate(ROOT)
    print("\n".join(str(f.relative_to(ROOT)) for f in files))
    return 0


if __name__ == "__main__":
    sys.exit(main())
