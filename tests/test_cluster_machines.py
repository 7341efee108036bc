"""The emulated machines that the README's cluster steps run on (tests/cluster_machines.py): an address, a
home and a /tmp of their own each, SSH between them, and nothing left behind."""
from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import pytest

from tests.cluster_machines import cannot_emulate, emulated_machines

WHY_NOT = cannot_emulate()
pytestmark = pytest.mark.skipif(WHY_NOT is not None, reason=WHY_NOT or "")


@pytest.fixture(scope="module")
def machines():
    with emulated_machines(3) as machines:
        yield machines


def test_each_machine_has_its_own_address_home_and_tmp(machines):
    for machine in machines:
        seen = machine.ssh(f"ip -4 -o addr show eth0 && touch /tmp/{machine.name} ~/{machine.name} && ls /tmp ~")
        assert f"inet {machine.address}/24" in seen.stdout
    for machine in machines:
        assert machine.ssh("ls /tmp ~").stdout.split() == ["/root:", machine.name, "/tmp:", machine.name]
    assert not Path("/tmp", machines[0].name).exists(), "a machine's /tmp is not this one's"


def test_a_machine_finds_its_own_address_by_routing_and_reaches_nowhere_else(machines):
    """Ray finds a node's address by routing towards the internet; the route leads nowhere."""
    found = machines[0].ssh("python3 -c 'import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
                            "s.connect((\"192.0.2.1\", 80)); print(s.getsockname()[0])'")
    assert found.stdout.strip() == machines[0].address
    cut_off = machines[0].ssh("python3 -c 'import socket; socket.create_connection((\"192.0.2.1\", 80), 2)'",
                              check=False)
    assert cut_off.returncode != 0 and "timed out" in cut_off.stderr


def test_a_machine_sees_and_stops_only_its_own_processes(machines):
    """As on separate computers: `ray stop` (which stops every Ray process it can see) stays on its machine."""
    first, second = machines[0], machines[1]
    first.ssh("nohup sleep 600 > /dev/null 2>&1 &")
    assert first.ssh("pgrep -x sleep", check=False).returncode == 0
    assert second.ssh("pgrep -x sleep", check=False).returncode == 1
    first.ssh("pkill -x sleep")


def test_machines_reach_each_other_and_this_one_reaches_them(machines):
    first, second = machines[0], machines[1]
    reached = first.ssh(f"python3 -c 'import socket; socket.create_connection((\"{second.address}\", 22), 5); "
                        "print(\"reached\")'")
    assert reached.stdout.strip() == "reached"
    assert second.ssh("echo $HOME").stdout.strip() == "/root"


def reaches(machine, other) -> bool:
    return machine.ssh(f"python3 -c 'import socket; socket.create_connection((\"{other.address}\", 22), 2)'",
                       check=False, timeout=30).returncode == 0


def test_an_unplugged_machine_is_cut_off_until_plugged_in_again(machines):
    first, second = machines[0], machines[1]
    second.unplug()
    try:
        assert not reaches(first, second)
        with pytest.raises(OSError):
            socket.create_connection((second.address, 22), 2)
    finally:
        second.plug()
    assert reaches(first, second)


def test_a_rebooted_machine_keeps_its_home_and_loses_its_processes_and_tmp(machines):
    machine = machines[2]
    machine.ssh("nohup sleep 600 > /dev/null 2>&1 & touch /tmp/before ~/before")
    machine.reboot()
    assert machine.ssh("pgrep -x sleep", check=False).returncode == 1
    assert machine.ssh("ls /tmp ~").stdout.split() == ["/root:", "before", machine.name, "/tmp:"]
    assert reaches(machines[0], machine)


def bridges() -> set[str]:
    return {line.split(":")[1].strip().split("@")[0] for line in subprocess.run(
        ["ip", "-o", "link", "show", "type", "bridge"], capture_output=True, text=True).stdout.splitlines()}


def test_nothing_is_left_behind():
    before = bridges()
    with emulated_machines(1) as (machine,):
        assert bridges() - before
        machine.ssh("nohup sleep 600 > /dev/null 2>&1 &")
        assert subprocess.run(["ip", "netns", "pids", machine.namespace], capture_output=True, text=True).stdout
    assert machine.namespace not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not machine.folder.exists()
    assert bridges() == before
