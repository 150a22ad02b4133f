"""Depth order of layers.

Layer rows carry `position`, the depth index the worker recorded from the engine's own order
(`model.layer_names()`); `layer_order` uses it. Rows written before positions were recorded have none,
and for those jobs the order is guessed from the names: name order is not depth order ("head" <
"layers", "blocks.10" < "blocks.2", "weight_hh" < "weight_ih"), but the engine names weight matrices
after PyTorch modules (`embed.weight`, `layers.0.rnn.weight_ih_l0`, `blocks.3.attn.qkv.weight`,
`head.weight`), so a key that puts embeddings first and the output head last, compares numbers as
numbers and knows the usual order inside a block recovers it (`depth_key`, the fallback).
app/ui/static/dashboard.js mirrors these functions.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

_FIRST = ("emb", "wte", "wpe")
_LAST = ("head", "lm_head", "output", "out", "decoder", "fc_out", "proj_out")
# order of parts inside one block (input-to-hidden before hidden-to-hidden, attention before output)
_PART_RANK = {"tok": 0, "pos": 1, "ih": 0, "hh": 1, "q": 0, "k": 1, "v": 2, "qkv": 0, "attn": 0,
              "in": 0, "fc": 1, "proj": 2, "mlp": 1, "ffn": 1}


def depth_key(name: str) -> tuple[object, ...]:
    """Sort key that orders weight-matrix names from input to output."""
    tokens = [t for t in re.split(r"[._]", name.lower()) if t]
    first = tokens[0] if tokens else ""
    if any(first.startswith(p) or first.endswith(p) for p in _FIRST) or "emb" in first:
        group = 0
    elif first in _LAST:
        group = 2
    else:
        group = 1
    parts: list[tuple[int, int, str]] = []
    for token in tokens:
        if token.isdigit():
            parts.append((0, int(token), ""))
        else:
            parts.append((1, _PART_RANK.get(token, 50), token))
    return (group, tuple(parts))


def depth_order(names: list[str] | set[str]) -> list[str]:
    """Names sorted from the input layer to the output layer."""
    return sorted(set(names), key=depth_key)


def _position(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def layer_order(rows: Iterable[Mapping[str, Any]]) -> list[str]:
    """Layer names of `rows` ({layer, position?, ...}) from the input layer to the output layer.

    By recorded `position` when every layer has one (from any of its rows; ties by the heuristic), else by the
    name heuristic for all of them (a job recorded before positions existed): one rule for the whole
    set, never a mix of the two."""
    positions: dict[str, int | None] = {}
    for row in rows:
        name, position = row["layer"], _position(row.get("position"))
        if position is not None or name not in positions:
            positions[name] = position
    if positions and all(p is not None for p in positions.values()):
        return sorted(positions, key=lambda n: (positions[n], depth_key(n), n))
    return depth_order(positions)
