"""This machine's probe figures, kept between runs: the runtime's fixed costs once (they are the same for every
model) and each model's speeds by its weight types and expert and attention shapes, so that `plan --estimate`
measures only what is not kept, and says so first, with the time it expects. Figures with doubts (probe.Probed)
are not kept."""
from __future__ import annotations

import hashlib
import json
import os
import platform
from pathlib import Path
from typing import Callable

from cluster.cost_model.estimate import MachineSpeed, ModelCost, check_probed_for, model_types
from cluster.cost_model.probe import (ATTENTION, EXPERTS, FIXED, FIXED_COST_METHOD, FIXED_COST_NAMES, GPU, MATMULS,
                                     Probed, gpu_name, probe)
from runtime.ggml_backends import ComputeDevice

PROBE_CACHE = Path.home() / ".cache" / "kimi-cluster" / "probe"
# Seconds of each phase until this machine's are kept (matmul speeds: per weight type), as measured on an idle
# 2-core machine (a whole probe of a 61-layer Q4_K_M model: 69 s).
IDLE_SECONDS = {MATMULS: 1.0, EXPERTS: 1.0, ATTENTION: 1.0, FIXED: 60.0, GPU: 10.0}


def _folder() -> Path:
    return PROBE_CACHE / platform.node()


def _model_path(cost: ModelCost) -> Path:
    key = f"{cost.expert_shape}; {cost.attention_shape}; {', '.join(sorted(model_types(cost)))}"
    return _folder() / f"model-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def kept_speed(cost: ModelCost, device: ComputeDevice | None = None) -> MachineSpeed | None:
    """The figures kept for a model of this cost's weight types and shapes, and for this GPU (or none), if any."""
    try:
        speed = MachineSpeed.from_dict(_read(_model_path(cost)) or {})
        check_probed_for(speed, cost, platform.node())
    except (ValueError, KeyError):  # none kept, or by an older version
        return None
    kept_gpu = speed.gpu.name if speed.gpu is not None else None
    return speed if kept_gpu == (gpu_name(device) if device is not None else None) else None


def kept_fixed() -> dict[str, float] | None:
    """The runtime's fixed costs kept for this machine, if measured on as many cores as this process has and the
    way today's probe measures them."""
    data = _read(_folder() / "fixed.json") or {}
    if (data.get("cores") != len(os.sched_getaffinity(0)) or data.get("measured_with") != FIXED_COST_METHOD
            or not all(name in data for name in FIXED_COST_NAMES)):
        return None
    return {name: float(data[name]) for name in FIXED_COST_NAMES}


def expected_seconds(cost: ModelCost, with_fixed: bool, with_gpu: bool = False) -> float:
    """How long a probe of this model will take here: its phases as long as they took last time, else on an
    idle 2-core machine."""
    seconds = {**IDLE_SECONDS, **(_read(_folder() / "seconds.json") or {})}
    return (seconds[MATMULS] * len(model_types(cost)) + seconds[EXPERTS] + seconds[ATTENTION]
            + (seconds[FIXED] if with_fixed else 0.0) + (seconds[GPU] if with_gpu else 0.0))


def describe_seconds(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


def keep(probed: Probed, cost: ModelCost) -> None:
    """Keep final figures: the model's, the fixed costs if this probe measured them, and the phases' times."""
    if probed.doubts:
        return
    _folder().mkdir(parents=True, exist_ok=True)
    figures = probed.speed.to_dict()
    _model_path(cost).write_text(json.dumps(figures))
    if FIXED in probed.seconds:
        fixed = {name: figures[name] for name in FIXED_COST_NAMES}
        (_folder() / "fixed.json").write_text(json.dumps({**fixed, "cores": probed.speed.cores,
                                                          "measured_with": FIXED_COST_METHOD}))
    seconds = {**(_read(_folder() / "seconds.json") or {}), **probed.seconds}
    seconds[MATMULS] = probed.seconds[MATMULS] / len(model_types(cost))
    (_folder() / "seconds.json").write_text(json.dumps(seconds))


def probe_here(cost: ModelCost, fresh: bool = False, say: Callable[[str], object] = lambda line: None,
               progress: bool = True, device: ComputeDevice | None = None) -> Probed:
    """This machine's figures for a model of this cost, and its GPU's (`device`) if it has one: kept from an
    earlier probe (unless `fresh`), else measured now (reusing the kept fixed costs unless `fresh`) and kept if
    final. Says first what it measures and how long that should take."""
    speed = None if fresh else kept_speed(cost, device)
    if speed is not None:
        return Probed(speed, {})
    fixed = None if fresh else kept_fixed()
    expected = describe_seconds(expected_seconds(cost, fixed is None, device is not None))
    if fresh:
        say(f"measuring this machine's figures for this model: about {expected} when the machine is idle, longer "
            "while other processes compute")
    elif fixed is None:
        say(f"no probe of this machine is kept for this model: measuring its figures now, about {expected} when "
            "the machine is idle, longer while other processes compute (`kimi-cluster probe MODEL` does the same "
            "and prints them)")
    else:
        say(f"no probe of this machine is kept for this model's weight types and shapes: measuring them now, "
            f"about {expected} (the runtime's fixed costs measured here before are reused)")
    probed = probe(cost, fixed, progress, device)
    keep(probed, cost)
    return probed
