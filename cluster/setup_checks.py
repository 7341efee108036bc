"""What `plan --config` checks before anything starts: the machines `ray up` starts (the Ray config's head_ip and
worker_ips), the cluster config's nodes and the nodes' TLS certificates agree, and the secrets are where they
belong. Problems are what `serve` would fail on, each said with what to change; warnings are what a dry run may
still lack (secrets not made yet) or should not have (the CA's key among the files every node gets).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from cluster.config import ClusterConfig
from cluster.security.certs import CA_KEY, ca_key_folder, certificate_problem
from cluster.security.ray_auth import token_at_hand

BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"  # `ray up` leaves its copy of the Ray config on the head


@dataclass
class SetupCheck:
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    checked: list[str] = field(default_factory=list)  # what was found to agree, for the user


def find_ray_config(config_path: Path, given: str | None) -> Path | None:
    """--ray-config; else the copy `ray up` left on the head; else ray-cluster.yaml beside the cluster config."""
    if given:
        return Path(given).expanduser()
    found = [p for p in (Path(BOOTSTRAP_CONFIG).expanduser(), config_path.parent / "ray-cluster.yaml") if p.is_file()]
    return found[0] if found else None


def check_setup(config: ClusterConfig, ray_config_path: Path | None) -> SetupCheck:
    check = SetupCheck()
    if ray_config_path is not None:
        _check_machines(config, ray_config_path, check)
        if not token_at_hand():
            check.warnings.append("no Ray token at ~/.ray/auth_token: make it where you run `ray up`, with "
                                  "`(umask 077 && ray get-auth-token --generate > /dev/null)`, for `ray up` to copy")
    if config.tls is not None:
        _check_certificates(config, check)
    return check


def _check_machines(config: ClusterConfig, path: Path, check: SetupCheck) -> None:
    try:
        provider = (yaml.safe_load(path.read_text()) or {}).get("provider") or {}
    except (OSError, yaml.YAMLError, AttributeError) as e:
        check.problems.append(f"cannot read the Ray config {path} ({type(e).__name__}: {e}); give --ray-config FILE")
        return
    if not config.nodes or provider.get("type") != "local":
        return  # Ray's own view of the machines decides (or a cloud's)
    head_ip, worker_ips = provider.get("head_ip"), list(provider.get("worker_ips") or [])
    ray_ips, head = [head_ip, *worker_ips], config.head_node
    before = len(check.problems)
    for node in config.nodes:
        if node.address not in ray_ips:
            check.problems.append(f"node '{node.name}' ({node.address}) in {config.source} is neither head_ip nor "
                                  f"among worker_ips in {path}: Ray will not run there; add it to worker_ips or "
                                  "correct its address")
    for ip in ray_ips:
        if ip not in {n.address for n in config.nodes}:
            check.problems.append(f"{path} starts Ray on {ip}, which no node in {config.source} has as its "
                                  "address: add the node (or take the machine out of the Ray config)")
    if head.address != head_ip and head.address in ray_ips:
        check.problems.append(f"{config.source} makes '{head.name}' ({head.address}) the head, but {path} starts "
                              f"Ray's head on {head_ip}, where `serve` runs: mark that node `head: true`")
    if len(check.problems) == before:
        check.checked.append(f"the nodes are the machines in {path}")


def _check_certificates(config: ClusterConfig, check: SetupCheck) -> None:
    tls, folder = config.tls, config.tls.ca.parent
    if (folder / CA_KEY).exists():
        check.warnings.append(f"{folder / CA_KEY}, which can make certificates every worker trusts, is in the "
                              f"folder copied to every node: move it out with `mkdir -m 700 {ca_key_folder(folder)} "
                              f"&& mv {folder / CA_KEY} {ca_key_folder(folder)}/` (where `kimi-cluster certs` "
                              "looks for it), and delete it on the nodes")
    certificates = {n: Path(tls.for_node(n.name)["cert"]) for n in config.nodes}
    if not tls.ca.is_file() or not all(path.is_file() for path in certificates.values()):
        return  # the config's loading said what is missing
    before = len(check.problems)
    for node, path in certificates.items():
        problem = certificate_problem(path, tls.ca, [node.name, node.address] if tls.per_node else [node.address])
        if problem:
            check.problems.append(f"{problem} (node '{node.name}' at {node.address} in {config.source}): make it "
                                  f"again with `kimi-cluster certs {folder} --nodes {node.name}={node.address}`")
    if config.nodes and len(check.problems) == before:
        check.checked.append("each node's certificate names it and its address")
