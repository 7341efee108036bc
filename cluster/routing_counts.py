"""How often the router picks each expert, kept across runs so that `replicas: auto` copies the hottest first.

The head counts every (token, expert) pair it routes (RemoteExperts.routed); when the cluster closes,
the counts are added to a small file per model in the cache folder, and the next plan reads them.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from runtime.gguf_file import GGUFModelFile

DEFAULT_DIR = Path.home() / ".cache" / "kimi-cluster" / "routing"


def counts_path(model_file: GGUFModelFile, folder: Path = DEFAULT_DIR) -> Path:
    """One file per model: named by the GGUF's file name, with its size and tensor layout hashed in."""
    first = Path(model_file.paths[0])
    layout = hashlib.sha256(f"{model_file.file_bytes}:{sorted(model_file.tensors)}".encode()).hexdigest()[:16]
    return folder / f"{first.name}.{layout}.npy"


def load(model_file: GGUFModelFile, shape: tuple[int, int], folder: Path = DEFAULT_DIR) -> np.ndarray | None:
    """The counts kept so far, [num_layers, num_experts], or None when there are none (or they do not fit)."""
    try:
        counts = np.load(counts_path(model_file, folder))
    except (OSError, ValueError):
        return None
    return counts if counts.shape == shape else None


def add(model_file: GGUFModelFile, counts: np.ndarray, folder: Path = DEFAULT_DIR) -> None:
    """Add this run's counts to the kept ones (written whole, then renamed: a crash leaves the old file)."""
    if not counts.any():
        return
    kept = load(model_file, counts.shape, folder)
    total = counts if kept is None else kept + counts
    path = counts_path(model_file, folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial.npy")
    np.save(partial, total)
    partial.replace(path)


def hottest(counts: np.ndarray | None, expert_bytes: np.ndarray, budget_bytes: int) -> dict[int, list[int]]:
    """The most routed experts whose bytes (expert_bytes: [num_layers, num_experts], 0 for dense layers) fit in
    budget_bytes, as layer -> expert ids. Without counts, as many of each layer, in id order."""
    layers, experts = np.nonzero(expert_bytes)
    heat = np.zeros(len(layers)) if counts is None else counts[layers, experts]
    chosen: dict[int, list[int]] = {}
    left = budget_bytes
    for i in np.lexsort((layers, experts, -heat)):  # hottest first; ties: expert j of every layer before j + 1
        if expert_bytes[layers[i], experts[i]] > left:
            break
        left -= expert_bytes[layers[i], experts[i]]
        chosen.setdefault(int(layers[i]), []).append(int(experts[i]))
    return chosen
