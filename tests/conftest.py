"""Shared fixtures: the project's own small Kimi-layout models, written once per test session."""
from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import threading
import time
from pathlib import Path

# Multi-node tests run every Ray node on this machine: make Ray's processes use loopback addresses only.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
# Ray waits 30 s for a new GCS to write its port; on a loaded 2-core machine it once took longer (a CI run
# lost test_estimate to it), so give it Ray's own allowance for a slow store.
os.environ.setdefault("RAY_gcs_server_port_wait_time_s", "120")

import pytest

from runtime.synthetic.demo_model import make_model
from runtime.synthetic.replica_model import write_sparse_replica
from tests.processes import live_descendants

LEFTOVER_GRACE_S = 20


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def make_tiny(model_dir):
    """make_tiny(quant=None, legacy=False) -> path of a tiny model, written on first use."""
    made: dict[tuple, Path] = {}

    def make(quant: str | None = None, legacy: bool = False) -> Path:
        key = (quant, legacy)
        if key not in made:
            name = f"tiny-{quant or 'F32'}{'-legacy' if legacy else ''}.gguf"
            made[key] = make_model(model_dir / name, "tiny", quant=quant, legacy_attention=legacy)
        return made[key]
    return make


@pytest.fixture(scope="session")
def tiny_f32(make_tiny) -> Path:
    return make_tiny()


@pytest.fixture(scope="session")
def tiny_q4km(make_tiny) -> Path:
    return make_tiny("Q4_K_M")


@pytest.fixture(scope="session")
def replica(model_dir) -> Path:
    """The first part of Kimi K2.6's sparse replica (8 parts, 340 GB of holes, a few MB of disk)."""
    return write_sparse_replica(model_dir / "replica" / "Kimi-K2.6-UD-Q2_K_XL.gguf")[0]


def pytest_configure(config):
    # Tests share two cores with llama.cpp subprocesses; keep BLAS from oversubscribing them.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h


def pytest_sessionstart(session):
    """Become a subreaper: a process that a test's children leave behind when they exit (Ray's agents when
    a raylet dies, a worker when its server is killed) becomes a child of this process instead of init's,
    so that the check at the end of the session finds it."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def pytest_sessionfinish(session, exitstatus):
    """Fail the run if a process started by a test is still alive once every test and fixture is done,
    naming it; then stop it, so that the run leaves nothing behind either way."""
    deadline = time.monotonic() + LEFTOVER_GRACE_S  # Ray's processes take a few seconds to exit
    while (leftovers := live_descendants()) and time.monotonic() < deadline:
        time.sleep(0.5)
    if not leftovers:
        return
    sys.stderr.write("\nprocesses started by the tests are still running after them:\n" +
                     "".join(f"  {pid} {name}\n" for pid, name in leftovers.items()))
    for pid in leftovers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_unconfigure(config):
    """A test that leaves a thread busy (an open gRPC stream on a server that was never stopped, say) keeps
    this process alive forever after the last test, since Python joins such threads at exit: fail loudly
    instead, naming them."""
    def fail_if_still_running():
        time.sleep(30)
        busy = [t.name for t in threading.enumerate() if t is not threading.current_thread()]
        sys.stderr.write(f"\nthe tests are over but these threads still run (a server or stream left open): "
                         f"{busy}\n")
        sys.stderr.flush()
        os._exit(3)
    threading.Thread(target=fail_if_still_running, daemon=True).start()
