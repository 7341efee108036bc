"""The probe's kept figures: `plan --estimate` says what it measures and how long that takes, reuses the fixed
costs measured before, and keeps no figure in doubt (measured while the machine was busy, or 0.0)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest

from cluster.cli.main import main
from cluster.cost_model import kept_probe
from cluster.cost_model.estimate import ModelCost
from cluster.cost_model.kept_probe import kept_fixed, kept_speed, probe_here
from cluster.cost_model.machine_load import BUSY_SHARE, OtherLoad
from cluster.cost_model.probe import ATTENTION, EXPERTS, FIXED, FIXED_COST_METHOD, FIXED_COST_NAMES, MATMULS
from runtime.gguf_file import GGUFModelFile
from runtime.model import checked_config

FIXED_COSTS = {"layer_ms": 0.11, "row_layer_us": 9.0, "sequence_layer_ms": 0.05, "remote_layer_ms": 0.4,
               "remote_expert_us": 3.0, "next_worker_ms": 0.3}


@pytest.fixture
def probe_cache(tmp_path, monkeypatch):
    """An empty place for this machine's kept figures, holding only the fixed costs measured before."""
    monkeypatch.setattr(kept_probe, "PROBE_CACHE", tmp_path)
    kept_probe._folder().mkdir(parents=True)
    keep_fixed(FIXED_COSTS)
    return tmp_path


def keep_fixed(fixed: dict) -> None:
    """Fixed costs as a probe of this machine keeps them (on as many cores, measured as today's probe measures them)."""
    (kept_probe._folder() / "fixed.json").write_text(json.dumps({**fixed, "cores": len(os.sched_getaffinity(0)),
                                                                  "measured_with": FIXED_COST_METHOD}))


def tiny_cost(path) -> ModelCost:
    model_file = GGUFModelFile(path)
    return ModelCost.from_model(model_file, checked_config(model_file))


def test_plan_estimate_says_it_probes_and_reuses_the_kept_fixed_costs(make_tiny, probe_cache, capsys):
    assert main(["plan", str(make_tiny()), "--estimate"]) in (0, None)
    out, err = capsys.readouterr()
    said = re.search(r"no probe of this machine is kept for this model's weight types and shapes: measuring "
                     r"them now, about (\d+) s \(the runtime's fixed costs measured here before are reused\)", err)
    assert said and int(said[1]) < 60, err
    assert "fixed costs (" not in err  # that phase did not run
    assert "estimated decode at 1024 tokens of context" in out
    assert kept_fixed() == FIXED_COSTS


def test_figures_in_doubt_are_named_and_not_kept(make_tiny, probe_cache):
    fixed = {**FIXED_COSTS, "row_layer_us": 0.0}  # as a probe whose per-row cost drowned in noise leaves it
    keep_fixed(fixed)
    cost = tiny_cost(make_tiny())
    probed = probe_here(cost, progress=False)
    assert "row_layer_us came out as 0.0" in probed.doubts
    assert set(probed.seconds) == {MATMULS, EXPERTS, ATTENTION}
    assert kept_speed(cost) is None  # measured again next time


def test_final_figures_are_kept_and_used_without_measuring(make_tiny, probe_cache):
    cost = tiny_cost(make_tiny())
    probed = probe_here(cost, progress=False)
    final = kept_probe.Probed(probed.speed, {**probed.seconds, FIXED: 100.0})  # as if measured on an idle machine
    kept_probe.keep(final, cost)
    said: list[str] = []
    again = probe_here(cost, say=said.append, progress=False)
    assert not said and again.seconds == {} and again.speed == kept_speed(cost)
    assert {name: getattr(again.speed, name) for name in FIXED_COST_NAMES} == FIXED_COSTS
    # the next model's probe expects the phases to take as long as they took here
    assert kept_probe.expected_seconds(cost, with_fixed=True) == pytest.approx(sum(final.seconds.values()), rel=0.01)


def test_fixed_costs_measured_otherwise_are_measured_again(probe_cache):
    (kept_probe._folder() / "fixed.json").write_text(json.dumps({**FIXED_COSTS, "cores": len(os.sched_getaffinity(0)),
                                                                  "measured_with": "a narrower model"}))
    assert kept_fixed() is None


def test_the_work_of_processes_the_probe_starts_is_its_own():
    """A child and a grandchild that compute (as Ray's processes and its workers do for the probe) are not other
    processes taking the cores, though this process never reaps the grandchild."""
    load = OtherLoad()
    busy = "import time\nend = time.process_time() + 3\nwhile time.process_time() < end: pass\n"
    grandchild = f"import subprocess, sys\nsubprocess.Popen([sys.executable, '-c', {busy!r}])\n{busy}"
    subprocess.run([sys.executable, "-c", grandchild], check=True)
    time.sleep(1.0)  # the grandchild, orphaned, computes on
    assert load.cores() < BUSY_SHARE * len(load.cpus)


def test_a_phase_shorter_than_the_kernels_tick_count_is_not_called_busy():
    """CPU time is counted in ticks (10 ms): phases of a few tens of milliseconds (a tiny model's attention and
    experts) read a tick of their own work as other load unless the count's error is allowed for."""
    for _ in range(20):
        load = OtherLoad()
        end = time.process_time() + 0.03
        while time.process_time() < end:
            pass
        assert load.cores() < BUSY_SHARE * len(load.cpus)
        assert load.cores() == load.cores()  # taken once
