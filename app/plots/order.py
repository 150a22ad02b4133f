"""Depth order of layer names.

The API returns layer rows sorted by name, which is not depth order ("head" < "layers", "blocks.10" <
"blocks.2", "weight_hh" < "weight_ih"). The engine names weight matrices after PyTorch modules
(`embed.weight`, `layers.0.rnn.weight_ih_l0`, `blocks.3.attn.qkv.weight`, `head.weight`), so a key
that puts embeddings first and the output head last, compares numbers as numbers and knows the usual
order inside a block recovers depth order. app/ui/static/dashboard.js mirrors this function.
"""

from __future__ import annotations

import re

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
