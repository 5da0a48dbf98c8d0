"""What a GGUF file holds, read with the gguf package: the tensor types it really uses. A "Q4_K_M" file is a
mix: llama.cpp keeps some tensors at higher precision by design, and falls back to q5_0/q6_K/q8_0 for rows
whose width is not a multiple of a K-quant block (256), as SmolLM2-135M's 576-wide rows are."""
from __future__ import annotations

from pathlib import Path
from typing import Any


def tensor_type_mix(path: Path) -> dict[str, Any]:
    """{"types": {TYPE: {tensors, parameters, bytes}}, "bits_per_weight"}: weights by their stored type."""
    from gguf import GGUFReader

    types: dict[str, dict[str, int]] = {}
    for tensor in GGUFReader(str(path)).tensors:
        entry = types.setdefault(tensor.tensor_type.name, {"tensors": 0, "parameters": 0, "bytes": 0})
        entry["tensors"] += 1
        entry["parameters"] += int(tensor.n_elements)
        entry["bytes"] += int(tensor.n_bytes)
    parameters = sum(entry["parameters"] for entry in types.values())
    stored = sum(entry["bytes"] for entry in types.values())
    ordered = dict(sorted(types.items(), key=lambda item: -item[1]["parameters"]))
    return {"types": ordered, "bits_per_weight": round(8 * stored / parameters, 3) if parameters else None}


def metadata(path: Path, keys: tuple[str, ...]) -> dict[str, Any]:
    """Scalar and string metadata fields of a GGUF, by key (None when absent)."""
    from gguf import GGUFReader

    fields = GGUFReader(str(path)).fields
    return {key: (fields[key].contents() if key in fields else None) for key in keys}
