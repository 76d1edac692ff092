"""The `coexit` command: a dispatcher over subcommands that packages register as entry points, and the one place
that turns errors into what a person at a terminal should read.

Each package (edge, cloud, training) declares its subcommands under the `coexit.commands` entry-point group in
pyproject.toml, so this module never imports them and the import direction stays coexit <- edge/cloud/training.
A subcommand is a function taking the remaining argv and returning an exit code; its module docstring's first
line is its description in `coexit --help`.

Errors: coexit's own (CoexitError: bad input, unreadable checkpoints, the cloud refusing or unreachable), a file
that is not there, and Ctrl-C print one line on stderr, `coexit COMMAND: what happened and what to do`, and exit
non-zero (2: the command line or its input, 1: the rest, 130: interrupted). Anything else is a bug and keeps its
traceback. `--debug` (anywhere on the command line) or COEXIT_DEBUG=1 shows the traceback of every error.
SIGTERM and SIGHUP (a closed terminal) end the command like Ctrl-C does, so its child processes are stopped too.
"""

from __future__ import annotations

import argparse
import ast
import errno
import os
import signal
import sys
import traceback
from importlib.metadata import PackageNotFoundError, entry_points, version

USAGE_EXIT, FAILURE_EXIT, INTERRUPT_EXIT = 2, 1, 130


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every subcommand's help: the description as written, and each option's default after its help."""

    def _get_help_string(self, action):
        if action.default is None or isinstance(action.default, bool) or "default" in (action.help or ""):
            return action.help  # nothing worth saying (a flag, an option off unless given), or said in words
        return super()._get_help_string(action)


def commands() -> dict[str, object]:
    return {ep.name: ep for ep in entry_points(group="coexit.commands")}


def coexit_version() -> str:
    try:
        return version("coexit")
    except PackageNotFoundError:
        return "unknown (not installed)"


SUMMARIES = {  # what `coexit --help` says of each command (others: their module docstring's first sentence)
    "demo": "The main job: a cloud on loopback, an emulated WAN link, and the edge's modes side by side",
    "serve": "Run the cloud service: the deep layers (and cloud-only decoding) over gRPC",
    "generate": "Complete one prompt from the edge, showing each token's origin",
    "edge-serve": "An OpenAI-compatible HTTP endpoint on the edge, backed by the edge SDK",
    "calibrate": "Choose exit thresholds (or a learned gate) for a target agreement with the full model",
    "evaluate": "Held-out accuracy, perplexity and exit agreement of a checkpoint, as a markdown table",
    "export-edge": "Write the edge layers as a llama.cpp GGUF (quantized, whole or in segments)",
    "adapt": "Adapt the edge layers to your own text on the device (windowed LoRA with exit losses)",
    "imatrix": "An importance matrix for llama.cpp's quantizer, from coexit's own torch model",
    "compress": "Choose one llama.cpp type per edge tensor within a bits budget, from measured sensitivity",
    "build-corpus": "Build the offline Python-source corpus that the bundled model was trained on",
    "prepare-data": "Tokenize text into training shards (and train a byte-level BPE tokenizer)",
    "train": "Train an early-exit model with DeepSpeed from a job file (run under torchrun or deepspeed)",
}


def describe(ep) -> str:
    """The first line of the command module's docstring, read without importing it (no torch at --help)."""
    module, _, _ = ep.value.partition(":")
    try:
        from importlib.util import find_spec

        spec = find_spec(module)
        doc = ast.get_docstring(ast.parse(open(spec.origin).read())) if spec and spec.origin else None
    except (ImportError, OSError, SyntaxError):
        doc = None
    line = (doc or "").strip().split("\n\n")[0].replace("\n", " ")
    line = line.split(": ", 1)[1] if line.startswith("`") and ": " in line else line
    line = line.split(". ")[0].rstrip(".")  # the first sentence
    return line[:1].upper() + line[1:]


def _usage(cmds: dict) -> str:
    lines = ["usage: coexit [--version] [--debug] COMMAND [ARGS]   (coexit COMMAND --help for its options)",
             "", "commands:"]
    width = max(map(len, cmds), default=0)
    for name in sorted(cmds):
        desc = SUMMARIES.get(name) or describe(cmds[name])
        lines.append(f"  {name:<{width}}  {desc}")
    return "\n".join(lines)


def _grpc_sentence(exc) -> str | None:
    """A status from the cloud as a sentence that says what to do; None when exc is not one."""
    import grpc

    code = getattr(exc, "code", None)
    code = code() if callable(code) else code
    if not isinstance(code, grpc.StatusCode):
        return None
    details = getattr(exc, "details", "")
    details = (details() if callable(details) else details) or ""
    address = getattr(exc, "address", None) or "the cloud"
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return f"{address} refused the bearer token ({details}): pass --token with the token the server was " \
               f"started with (its --token or an identity of its --auth-file)"
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return f"cannot reach {address} ({details}): check --cloud HOST:PORT and that `coexit serve` runs there " \
               f"(with TLS, pass --tls-ca)"
    return f"{address} answered {code.name}: {details}"


def _os_sentence(exc: OSError) -> str | None:
    if exc.errno == errno.EADDRINUSE:
        return f"{exc.strerror or exc}: another process holds that port; pick another one"
    if isinstance(exc, (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)) and exc.filename:
        return f"{exc.strerror}: {exc.filename}"
    return None


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def run(name: str, ep, rest: list[str], debug: bool) -> int:
    """Import and run one subcommand, printing coexit's own errors as one line."""
    from coexit.errors import CoexitError, UsageError

    def fail(msg: str, code: int) -> int:
        if debug:
            traceback.print_exc()
        print(f"coexit {name}: {msg}", file=sys.stderr, flush=True)
        return code

    try:
        return int(ep.load()(rest) or 0)
    except KeyboardInterrupt as exc:
        return fail(f"interrupted ({exc.args[0] if exc.args else 'SIGINT'})", INTERRUPT_EXIT)
    except CoexitError as exc:
        sentence = _grpc_sentence(exc)
        return fail(sentence or str(exc), USAGE_EXIT if isinstance(exc, UsageError) else FAILURE_EXIT)
    except OSError as exc:
        if (sentence := _os_sentence(exc)) is None:
            raise
        return fail(sentence, FAILURE_EXIT)
    except Exception as exc:
        if (sentence := _grpc_sentence(exc)) is None:
            print(f"coexit {name}: an unexpected error, which is a bug in coexit: please report it with this "
                  f"traceback", file=sys.stderr)
            raise
        return fail(sentence, FAILURE_EXIT)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get("COEXIT_DEBUG", "") not in ("", "0") or "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    cmds = commands()
    if argv and argv[0] in ("-V", "--version"):
        print(f"coexit {coexit_version()}")
        return 0
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage(cmds))
        return 0
    name, rest = argv[0], argv[1:]
    if name not in cmds:
        print(f"coexit: unknown command {name!r}; known: {', '.join(sorted(cmds))}", file=sys.stderr)
        return USAGE_EXIT
    for sig in (signal.SIGTERM, signal.SIGHUP):  # like Ctrl-C: finally blocks run and children are stopped
        if signal.getsignal(sig) != signal.SIG_IGN:  # (not SIGHUP under nohup)
            signal.signal(sig, _raise_interrupt)
    return run(name, cmds[name], rest, debug)


if __name__ == "__main__":
    sys.exit(main())
