"""Identities: who may call the server and what share of it each may hold.

`--token T` is the one-identity shorthand (identity "default", no limits of its own). `--auth-file F` names
identities in TOML, each with the sha256 of its bearer token (the server never stores tokens) and optional limits:

    [identities.alice]
    token_sha256 = "<hex of sha256(token)>"   # printf %s "$TOKEN" | sha256sum
    max_sessions = 8                          # sessions it may hold at once (0: only the server's cap)
    kv_share = 0.25                           # fraction of the KV pool's blocks it may hold (1: all)

The interceptor maps the presented token to an identity; the session manager binds each session to the identity
that opened it and enforces its limits.
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass(frozen=True)
class Identity:
    name: str
    max_sessions: int = 0  # 0: no cap of its own
    kv_share: float = 1.0  # fraction of the pool's blocks


ANONYMOUS = Identity("")  # a server without auth: every caller


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Auth:
    def __init__(self, by_hash: dict[str, Identity]) -> None:
        self.by_hash = by_hash

    @classmethod
    def from_token(cls, token: str) -> Auth:
        return cls({hash_token(token): Identity("default")})

    @classmethod
    def from_file(cls, path: str | Path) -> Auth:
        try:
            data = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ValueError(f"{path}: {exc}") from None
        extra = set(data) - {"identities"}
        if extra or not isinstance(data.get("identities"), dict) or not data["identities"]:
            raise ValueError(f"{path}: expected only [identities.NAME] tables, got {sorted(data)}")
        by_hash: dict[str, Identity] = {}
        for name, spec in data["identities"].items():
            where = f"{path}: identity {name!r}"
            unknown = set(spec) - {"token_sha256", "max_sessions", "kv_share"}
            if unknown:
                raise ValueError(f"{where}: unknown keys {sorted(unknown)}")
            digest = str(spec.get("token_sha256", "")).lower()
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                raise ValueError(f"{where}: token_sha256 must be 64 hex digits (printf %s \"$TOKEN\" | sha256sum)")
            if digest in by_hash:
                raise ValueError(f"{where}: the same token as identity {by_hash[digest].name!r}")
            ident = Identity(name, int(spec.get("max_sessions", 0)), float(spec.get("kv_share", 1.0)))
            if ident.max_sessions < 0 or not 0.0 < ident.kv_share <= 1.0:
                raise ValueError(f"{where}: max_sessions must be >= 0 and kv_share in (0, 1]")
            by_hash[digest] = ident
        return cls(by_hash)

    @property
    def identities(self) -> dict[str, Identity]:
        return {i.name: i for i in self.by_hash.values()}

    def identify(self, authorization: str) -> Identity | None:
        """The identity of an `authorization: Bearer <token>` header, or None."""
        if not authorization.startswith("Bearer "):
            return None
        return self.by_hash.get(hash_token(authorization[len("Bearer "):]))
