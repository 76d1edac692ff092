"""The `coexit` command: a dispatcher over subcommands that packages register as entry points.

Each package (edge, cloud, training) declares its subcommands under the `coexit.commands` entry-point group in
pyproject.toml, so this module never imports them and the import direction stays coexit <- edge/cloud/training.
A subcommand is a function taking the remaining argv and returning an exit code.
"""

from __future__ import annotations

import sys
from importlib.metadata import entry_points


def commands() -> dict[str, object]:
    return {ep.name: ep for ep in entry_points(group="coexit.commands")}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cmds = commands()
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: coexit COMMAND [ARGS]\n\ncommands:")
        for name in sorted(cmds):
            print(f"  {name}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in cmds:
        print(f"coexit: unknown command {name!r}; known: {', '.join(sorted(cmds))}", file=sys.stderr)
        return 2
    return int(cmds[name].load()(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
