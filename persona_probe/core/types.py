"""Types shared by every layer."""

from __future__ import annotations

from typing import Union

LayerId = Union[int, str]  # a decoder layer index (output of block L), or "embed" (the embeddings)
