"""The edge backend contract: what EdgeClient needs from a shallow-stage runtime, whatever runs it.

A backend holds layers [0, split) of one checkpoint with the exit heads in (0, split], and decodes one sequence.
The cloud cannot tell backends apart: all it sees are split-layer hidden rows.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from torch import Tensor

from coexit.config import Config
from coexit.decoding import Decide, RunResult


class EdgeBackend(ABC):
    name: str = "abstract"
    config: Config
    fingerprint: str  # of the checkpoint it was built from; the cloud must present the same

    @property
    def split(self) -> int:
        return self.config.split_layer

    @property
    def exit_layers(self) -> list[int]:
        """Exit layers this backend evaluates, in order (all in (0, split])."""
        return self.config.edge_exit_layers

    @abstractmethod
    def step(self, token_ids: list[int], first: int, decide: Decide | None, to_split: bool = False) -> RunResult:
        """Run tokens at positions [first, first + n). Exit heads are evaluated on the newest row, in order;
        the first that `decide` accepts stops it there (RunResult.exited, .depth). Rows that reach the split
        (now, or later through KV recomputation) become available from take_split_rows(). With to_split the
        accepted exit is only recorded and the rows still run to the split (lossless drafting: the cloud
        verifies every drafted position from its split row)."""

    @abstractmethod
    def take_split_rows(self) -> tuple[int, Tensor]:
        """Remove and return (first position, fp32 rows (n, C)) of split-layer hidden states produced since the
        last call. Rows come out in position order, each exactly once."""

    @property
    @abstractmethod
    def next_position(self) -> int:
        """The first position the backend has not seen."""

    @property
    def max_length(self) -> int:
        """Positions one sequence may hold (prompt and generated tokens together)."""
        return self.config.max_position_embeddings

    @property
    def layer_tokens(self) -> int:
        """Layer-row computations performed so far (for compute accounting)."""
        return 0

    @abstractmethod
    def truncate(self, length: int) -> None:
        """Forget positions >= length (rollback): their KV and any split rows not yet taken."""

    @abstractmethod
    def reset(self) -> None:
        """Forget the sequence (start a new one at position 0)."""
