"""Emulated machines for the tests that run the README's cluster steps: each one a network namespace with an
address of its own on a private bridge, its own home (/root) and /tmp (a mount namespace with bind mounts, so
that Ray's session folders and venvs do not collide), its own processes (a PID namespace), and an sshd that
accepts a key made for the test.

Everything lives under a folder outside /tmp (which each machine replaces with its own) and is removed on the
way out, processes first, even when the test fails. Traffic to the machines' addresses stays on the bridge:
the subnet is private to the test. Needs root, network namespaces and an sshd; `machines_or_skip` says why
not when one is missing.
"""
from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

SSHD = Path("/usr/sbin/sshd")
_SERIALS = itertools.count()  # tells apart the sets of machines of one test run
SSH_OPTIONS = ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes",
               "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=10"]
SSHD_CONFIG = """\
ListenAddress {address}
Port 22
HostKey {folder}/host_key
AuthorizedKeysFile {authorized_keys}
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PidFile {folder}/sshd.pid
"""


@dataclass(frozen=True)
class Machine:
    name: str
    address: str
    namespace: str  # the network namespace
    folder: Path  # home/, tmp/ and the sshd's files
    key: Path  # the private key its sshd accepts (root's login)
    port: str  # the bridge's end of its cable (a veth)

    def ssh_command(self, command: str) -> list[str]:
        """The command line that runs `command` on the machine over SSH, as a user would."""
        return ["ssh", "-i", str(self.key), *SSH_OPTIONS, f"root@{self.address}", command]

    def ssh(self, command: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(self.ssh_command(command), capture_output=True, text=True, timeout=timeout,
                              check=check)

    def unplug(self) -> None:
        """Its cable pulled: the switch's port goes down, and every packet to or from the machine is lost."""
        _run("ip", "link", "set", self.port, "down")

    def plug(self) -> None:
        _run("ip", "link", "set", self.port, "up")

    def reboot(self) -> None:
        """Every process on it killed at once (a power cut), /tmp emptied, then it boots: its sshd, and nothing
        else, starts again. Returns once it answers over SSH."""
        _kill_processes(self)
        shutil.rmtree(self.folder / "tmp")
        (self.folder / "tmp").mkdir()
        (self.folder / "tmp").chmod(0o1777)
        _boot(self)
        _wait_for_ssh(self)


def cannot_emulate() -> str | None:
    """Why machines cannot be emulated here, or None."""
    if os.geteuid() != 0:
        return "emulated machines need root (network and mount namespaces, an sshd)"
    if not SSHD.exists():
        return f"emulated machines need an sshd ({SSHD}; Debian's openssh-server)"
    if not all(shutil.which(tool) for tool in ("ip", "unshare", "ssh", "ssh-keygen")):
        return "emulated machines need ip (iproute2), unshare, ssh and ssh-keygen"
    probe = f"kimi-probe-{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"this machine does not allow network namespaces: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], check=True)
    return None


@contextlib.contextmanager
def emulated_machines(count: int, environment: dict[str, str] | None = None) -> Iterator[list[Machine]]:
    """`count` machines at 10.X.Y.2, .3, ... (a subnet picked for this run), reachable over SSH from here;
    `environment`: variables every SSH session on them gets (as a machine's /etc/environment would give)."""
    serial = next(_SERIALS)
    tag = f"{os.getpid() % 100000}{serial}"
    subnet = f"10.{200 + os.getpid() % 50}.{(os.getpid() + serial) % 250}"
    bridge = f"kmbr{tag}"
    base = Path(tempfile.mkdtemp(prefix="kimi-machines-", dir="/var/tmp"))
    machines: list[Machine] = []
    try:
        _run("ip", "link", "add", bridge, "type", "bridge")
        _run("ip", "addr", "add", f"{subnet}.1/24", "dev", bridge)
        _run("ip", "link", "set", bridge, "up")
        key = base / "client_key"
        _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key))
        authorized = base / "authorized_keys"
        shutil.copy(f"{key}.pub", authorized)
        Path("/run/sshd").mkdir(exist_ok=True)  # the sshd's privilege separation folder
        for i in range(count):
            machine = Machine(f"machine-{i + 1}", f"{subnet}.{i + 2}", f"kimi-{tag}-{i + 1}", base / f"m{i + 1}",
                              key, f"kv{tag}-{i + 1}")
            machines.append(machine)
            _start_machine(machine, bridge, authorized, environment or {})
        for machine in machines:
            _wait_for_ssh(machine)
        yield machines
    finally:
        for machine in machines:
            _stop_machine(machine)
        subprocess.run(["ip", "link", "del", bridge], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


def _start_machine(machine: Machine, bridge: str, authorized_keys: Path, environment: dict[str, str]) -> None:
    for sub in ("home", "tmp"):
        (machine.folder / sub).mkdir(parents=True)
    (machine.folder / "tmp").chmod(0o1777)
    _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(machine.folder / "host_key"))
    config = SSHD_CONFIG.format(address=machine.address, folder=machine.folder, authorized_keys=authorized_keys)
    if environment:
        config += "SetEnv " + " ".join(f"{name}={value}" for name, value in environment.items()) + "\n"
    (machine.folder / "sshd_config").write_text(config)
    _run("ip", "netns", "add", machine.namespace)
    _run("ip", "link", "add", machine.port, "type", "veth", "peer", "name", "eth0", "netns", machine.namespace)
    _run("ip", "link", "set", machine.port, "master", bridge, "up")
    _run("ip", "-n", machine.namespace, "addr", "add", f"{machine.address}/24", "dev", "eth0")
    _run("ip", "-n", machine.namespace, "link", "set", "eth0", "up")
    _run("ip", "-n", machine.namespace, "link", "set", "lo", "up")
    # A default route into a dead end of the machine's own (a veth pair both of whose ends it holds): programs
    # that find their address by routing towards the internet (Ray does) find the machine's, and nothing the
    # machine sends to any other address leaves it.
    _run("ip", "-n", machine.namespace, "link", "add", "nowhere0", "type", "veth", "peer", "name", "nowhere1")
    for end in ("nowhere0", "nowhere1"):
        _run("ip", "-n", machine.namespace, "link", "set", end, "up")
    _run("ip", "-n", machine.namespace, "route", "add", "default", "dev", "nowhere0")
    _boot(machine)


def _boot(machine: Machine) -> None:
    # The sshd, and every session it opens, sees the machine's own home and /tmp, and its own processes only
    # (a PID namespace: `ray stop` on one machine must not stop another's Ray).
    mounts = f"mount --bind {machine.folder}/home /root && mount --bind {machine.folder}/tmp /tmp"
    log = open(machine.folder / "sshd.log", "w")
    subprocess.Popen(["ip", "netns", "exec", machine.namespace, "unshare", "--mount", "--propagation", "private",
                      "--pid", "--fork", "--mount-proc",
                      "sh", "-c", f"{mounts} && exec {SSHD} -D -e -f {machine.folder}/sshd_config"],
                     stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()


def _wait_for_ssh(machine: Machine, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while machine.ssh("true", timeout=15, check=False).returncode != 0:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{machine.name}'s sshd did not answer: {(machine.folder / 'sshd.log').read_text()}")
        time.sleep(0.2)


def _stop_machine(machine: Machine) -> None:
    """Every process on the machine, then its network namespace."""
    _kill_processes(machine)
    subprocess.run(["ip", "netns", "del", machine.namespace], capture_output=True)


def _kill_processes(machine: Machine) -> None:
    """Every process in the machine's network namespace: its sshd, and what its sessions started."""
    for _ in range(3):
        pids = subprocess.run(["ip", "netns", "pids", machine.namespace], capture_output=True, text=True).stdout
        if not pids.split():
            break
        for pid in pids.split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        time.sleep(0.5)


def _run(*command: str) -> None:
    subprocess.run(command, check=True, capture_output=True)
