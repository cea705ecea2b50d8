"""StreamingLLM: attention sinks plus a window of the most recent tokens."""

from __future__ import annotations

from dataclasses import dataclass

from namm.policies.ranked import RankedPolicy, protect


@dataclass
class StreamingLLM(RankedPolicy):
    """Keep the first ``n_sink`` tokens (attention sinks) and fill the rest of the budget with the
    most recent tokens. Xiao et al., "Efficient Streaming Language Models with Attention Sinks",
    arXiv 2309.17453 (4 sink tokens in the paper).
    """

    n_sink: int = 4
    name = "streaming"
    state_fields = ()  # positions only

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.n_sink, int) or self.n_sink < 0:
            raise ValueError(f"n_sink must be a non-negative number of tokens, got {self.n_sink!r}.")

    def scores(self, layer: int, n_keep: int) -> torch.Tensor:
        positions = self._positions[layer]
        return protect(positions.float(), positions, n_sink=self.n_sink)  # newer scores higher


@dataclass
class Recency(StreamingLLM):
    """Keep only the most recent tokens: StreamingLLM without sinks, the ``Recency`` baseline of
    the NAMM reference code (arXiv 2410.13166)."""

    n_sink: int = 0
    name = "recency"
