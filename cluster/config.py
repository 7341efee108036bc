"""ClusterConfig: where the model is, which machines take part and with how much memory, how they talk.

Loaded from YAML (configs/cluster.example.yaml documents every key). Unknown keys, wrong types and
out-of-range values are refused with the key, the file and what is allowed: a typo must not silently
fall back to a default on a 340 GB deployment.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml

from cluster.cost_model.estimate import MachineSpeed
from cluster.placement import REPLICA_MODES, GiB, NodeBudget

WIRE_DTYPES = ("f32", "f16", "bf16")
MIN_TOKEN_CHARS = 16
TOP_LEVEL_KEYS = ("ray_address", "model", "model_paths", "nodes", "reserve_gb", "port", "token", "token_file",
                  "tls", "wire_dtype", "allow_disk", "context", "max_sequences", "threads", "deadline_s",
                  "api_key", "replicas", "respread_after_s")
NODE_KEYS = ("name", "address", "memory_gb", "head", "speed", "round_trip_ms", "link_gbps", "gpu", "gpu_experts_gb")
TLS_KEYS = ("cert", "key", "ca")
NODE_PLACEHOLDER = "{node}"  # in tls paths: each node's name
_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false",
               list: "a list", dict: "a mapping"}


_ABSENT = object()  # a key the file leaves out


class ClusterConfigError(ValueError):
    """A cluster config that cannot be used, naming the file and the key."""


@dataclass(frozen=True)
class NodeConfig:
    name: str
    address: str  # hostname or IP, as Ray sees the node
    memory_gb: float  # GiB this node offers in total (the reserve is taken off it)
    is_head: bool = False
    speed: MachineSpeed | None = None  # what `kimi-cluster probe` measured on it, for `plan --estimate`
    round_trip_ms: float = 0.0  # its link's round trip to the head, beyond loopback
    link_gbps: float = 1.25  # its link's bandwidth in GB/s (10 GbE: 1.25)
    # A worker's GPU (as --gpu names one: auto, cpu or N) and how many GiB of its experts go there, the most routed
    # first; 0: none
    gpu: str | int = "auto"
    gpu_experts_gb: float = 0.0


@dataclass(frozen=True)
class TLSFiles:
    """PEM files for mutual TLS; cert and key may hold {node}, each node's name (`kimi-cluster certs` names its
    files so)."""
    cert: Path
    key: Path
    ca: Path

    @property
    def per_node(self) -> bool:
        return NODE_PLACEHOLDER in str(self.cert) or NODE_PLACEHOLDER in str(self.key)

    def for_node(self, name: str) -> dict[str, str]:
        """The files of node `name`, as the transport takes them."""
        return {"cert": str(self.cert).replace(NODE_PLACEHOLDER, name),
                "key": str(self.key).replace(NODE_PLACEHOLDER, name), "ca": str(self.ca)}


@dataclass(frozen=True)
class ClusterConfig:
    model: Path | None  # the GGUF's first file, as every node sees it (None: the command's MODEL)
    ray_address: str | None = None  # None: start a local Ray
    model_paths: dict[str, Path | None] = field(default_factory=dict)  # per-node override; None: no local copy
    nodes: tuple[NodeConfig, ...] = ()  # empty: use the nodes Ray reports
    reserve_gb: float = 4.0
    port: int = 50551
    token: str | None = None  # None: the head makes a random one per run and hands it to the workers it starts
    tls: TLSFiles | None = None
    wire_dtype: str = "f32"
    allow_disk: bool = False
    context: int | None = None  # tokens per sequence; None: the largest the head holds (context_plan.py)
    max_sequences: int = 16
    threads: int | None = None  # None: every core Ray gives the process
    deadline_s: float = 3.0  # per worker request (and per 512 pairs in it); then the worker counts as failed
    api_key: str | None = None  # clients of `serve` must send it as a Bearer token; None: no key
    replicas: str = "0"  # second copies of workers' experts: "0" none, "1" all (or refuse), "auto" what fits
    respread_after_s: float = 30.0  # a worker down this long has its experts loaded by survivors with room
    source: str = "<dict>"  # where this came from, for later error messages

    @classmethod
    def from_yaml(cls, path: str | Path, missing_secret: Callable[[str], None] | None = None) -> ClusterConfig:
        """missing_secret: told of each token or TLS file that does not exist yet, instead of refusing the file
        (a dry run before the secrets are made); such a config has no token."""
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text())
        except FileNotFoundError:
            raise ClusterConfigError(f"{path}: no such file; copy configs/cluster.example.yaml and edit it") from None
        except yaml.YAMLError as e:
            raise ClusterConfigError(f"{path}: not valid YAML: {e}") from None
        return cls.from_dict(data, source=str(path), base_dir=path.parent, missing_secret=missing_secret)

    @classmethod
    def from_dict(cls, data: Any, source: str = "<dict>", base_dir: str | Path | None = None,
                  missing_secret: Callable[[str], None] | None = None) -> ClusterConfig:
        """base_dir anchors relative token_file and tls paths (the config file's folder); missing_secret as in
        from_yaml."""
        missing = missing_secret or _refuse
        base = Path(base_dir) if base_dir is not None else Path.cwd()
        top = _Section(data, "top level", source, TOP_LEVEL_KEYS)
        listed = top.get("nodes", list, [], nullable=True) or []
        nodes = tuple(_node(item, f"nodes[{i}]", source) for i, item in enumerate(listed))
        _check_nodes(nodes, source)
        values = dict(
            model=_optional_path(top.get("model", str, None, nullable=True)),
            ray_address=top.get("ray_address", str, nullable=True),
            model_paths=_model_paths(top.get("model_paths", dict, {}, nullable=True) or {}, nodes, source),
            nodes=nodes,
            reserve_gb=top.get("reserve_gb", float, at_least=0),
            port=top.get("port", int, at_least=1, at_most=65535),
            token=_token(top, base, source, missing),
            tls=_tls(top.get("tls", dict, None, nullable=True), base, source, nodes, missing),
            wire_dtype=top.get("wire_dtype", str, choices=WIRE_DTYPES),
            allow_disk=top.get("allow_disk", bool),
            context=top.get("context", int, at_least=1),
            max_sequences=top.get("max_sequences", int, at_least=1),
            threads=top.get("threads", int, nullable=True, at_least=1),
            deadline_s=top.get("deadline_s", float, above=0),
            api_key=top.get("api_key", str, nullable=True),
            replicas=_replicas(top, source),
            respread_after_s=top.get("respread_after_s", float, at_least=0),
        )
        # Keys left out of the file take the dataclass defaults above.
        return cls(**{k: v for k, v in values.items() if v is not _ABSENT}, source=source)

    @property
    def reserve_bytes(self) -> int:
        return int(self.reserve_gb * GiB)

    def model_path_for(self, node: str) -> Path | None:
        """The model's path on `node`; None when the node has no copy and gets its experts from the head."""
        return self.model_paths[node] if node in self.model_paths else self.model

    @property
    def head_node(self) -> NodeConfig | None:
        """The node marked `head: true`, else the first one listed."""
        return next((n for n in self.nodes if n.is_head), self.nodes[0] if self.nodes else None)

    def node_budgets(self) -> list[NodeBudget]:
        return [NodeBudget(n.name, int(n.memory_gb * GiB), n is self.head_node) for n in self.nodes]


class _Section:
    """One mapping of the YAML, with typed, range-checked access and its unknown keys refused up front."""

    def __init__(self, data: Any, where: str, source: str, allowed: tuple[str, ...]):
        if not isinstance(data, dict):
            found = "empty" if data is None else f"a {type(data).__name__}"
            raise ClusterConfigError(f"{source}: {where} must be a mapping of keys to values, but is {found}")
        for key in data:
            if key not in allowed:
                raise ClusterConfigError(f"{source}: unknown key '{key}' ({where}); allowed keys: "
                                         f"{', '.join(allowed)}")
        self.data, self.where, self.source = data, where, source

    def get(self, key: str, kind: type, default: Any = _ABSENT, *, required: bool = False, nullable: bool = False,
            at_least: float | None = None, at_most: float | None = None, above: float | None = None,
            choices: tuple[str, ...] | None = None) -> Any:
        name = f"'{key}'" if self.where == "top level" else f"'{key}' in {self.where}"
        if key not in self.data:
            if required:
                raise ClusterConfigError(f"{self.source}: missing required key {name}")
            return default
        value = self.data[key]
        if value is None and nullable:
            return None
        # YAML's true/false are ints to Python; integers are fine where a number is wanted.
        is_kind = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value, is_kind = float(value), True
        if not is_kind:
            expected = _TYPE_NAMES[kind] + (" or null" if nullable else "")
            found = "null" if value is None else type(value).__name__
            raise ClusterConfigError(f"{self.source}: {name} must be {expected}, not {found} ({value!r})")
        problem = None
        if at_least is not None and value < at_least:
            problem = f"at least {at_least:g}"
        elif at_most is not None and value > at_most:
            problem = f"at most {at_most:g}"
        elif above is not None and value <= above:
            problem = f"more than {above:g}"
        elif choices is not None and value not in choices:
            problem = f"one of {', '.join(choices)}"
        elif kind is str and not value:
            problem = "a non-empty string"
        if problem:
            raise ClusterConfigError(f"{self.source}: {name} must be {problem}, not {value!r}")
        return value


def _optional_path(value: str | None) -> Path | None:
    return None if value is None else Path(value)


def _node(data: Any, where: str, source: str) -> NodeConfig:
    section = _Section(data, where, source, NODE_KEYS)
    return NodeConfig(name=section.get("name", str, required=True),
                      address=section.get("address", str, required=True),
                      memory_gb=section.get("memory_gb", float, required=True, above=0),
                      is_head=section.get("head", bool, False),
                      speed=_speed(section.get("speed", dict, None, nullable=True), where, source),
                      round_trip_ms=section.get("round_trip_ms", float, 0.0, at_least=0),
                      link_gbps=section.get("link_gbps", float, 1.25, above=0),
                      gpu=_gpu(section, where, source),
                      gpu_experts_gb=section.get("gpu_experts_gb", float, 0.0, at_least=0))


def _gpu(section: _Section, where: str, source: str) -> str | int:
    value = section.data.get("gpu", "auto")
    if value in ("auto", "cpu") or (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
        return value
    raise ClusterConfigError(f"{source}: 'gpu' in {where} must be auto, cpu or a GPU's number, not {value!r}")


def _speed(data: Mapping[str, Any] | None, where: str, source: str) -> MachineSpeed | None:
    if data is None:
        return None
    try:
        return MachineSpeed.from_dict(data)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ClusterConfigError(f"{source}: 'speed' in {where} is not what `kimi-cluster probe` prints "
                                 f"({type(e).__name__}: {e}); paste its output again") from None


def _check_nodes(nodes: tuple[NodeConfig, ...], source: str) -> None:
    names = [n.name for n in nodes]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ClusterConfigError(f"{source}: node names must be unique in 'nodes'; repeated: {', '.join(repeated)}")
    heads = [n.name for n in nodes if n.is_head]
    if len(heads) > 1:
        raise ClusterConfigError(f"{source}: only one node can have 'head: true'; found {', '.join(heads)}")


def _model_paths(data: Mapping[Any, Any], nodes: tuple[NodeConfig, ...], source: str) -> dict[str, Path | None]:
    names = {n.name for n in nodes}
    paths: dict[str, Path | None] = {}
    for node, path in data.items():
        if not isinstance(node, str):
            raise ClusterConfigError(f"{source}: 'model_paths' keys must be node names, not {node!r}")
        if names and node not in names:
            raise ClusterConfigError(f"{source}: 'model_paths' names node '{node}', which is not in 'nodes' "
                                     f"({', '.join(sorted(names))})")
        if path is not None and not (isinstance(path, str) and path):
            raise ClusterConfigError(f"{source}: 'model_paths' entry for '{node}' must be a path or null "
                                     f"(no local copy), not {path!r}")
        paths[node] = None if path is None else Path(path)
    return paths


def _refuse(problem: str) -> None:
    raise ClusterConfigError(problem)


def _token(top: _Section, base: Path, source: str, missing: Callable[[str], None]) -> str | None:
    token = top.get("token", str, None, nullable=True)
    token_file = top.get("token_file", str, None, nullable=True)
    if token is not None and token_file is not None:
        raise ClusterConfigError(f"{source}: give 'token' or 'token_file', not both")
    if token_file is not None:
        path = base / Path(token_file).expanduser()
        try:
            token = path.read_text().strip()
        except FileNotFoundError:
            missing(f"{source}: 'token_file' {path} does not exist; create it with "
                    f"`(umask 077 && openssl rand -hex 32 > {path})` (readable by you only)")
            return None
        except OSError as e:
            raise ClusterConfigError(f"{source}: cannot read 'token_file' {path}: {e.strerror}") from None
        where = f"the token in {path}"
    else:
        where = "'token'"
    if token is not None and len(token) < MIN_TOKEN_CHARS:
        raise ClusterConfigError(f"{source}: {where} has {len(token)} characters; use at least {MIN_TOKEN_CHARS}, "
                                 "e.g. from `openssl rand -hex 32`")
    return token


def _replicas(top: _Section, source: str) -> Any:
    value = top.data.get("replicas", _ABSENT)
    if value is _ABSENT:
        return value
    if str(value) not in REPLICA_MODES or isinstance(value, bool):
        raise ClusterConfigError(f"{source}: 'replicas' must be 0 (none), 1 (every worker's expert twice) or auto "
                                 f"(as many as the memory left over holds), not {value!r}")
    return str(value)


def _tls(data: Mapping[str, Any] | None, base: Path, source: str, nodes: tuple[NodeConfig, ...],
         missing: Callable[[str], None]) -> TLSFiles | None:
    if data is None:
        return None
    section = _Section(data, "'tls'", source, TLS_KEYS)
    tls = TLSFiles(**{key: base / Path(section.get(key, str, required=True)).expanduser() for key in TLS_KEYS})
    # Per-node files are checked for the nodes listed (every node has them all: the whole folder is copied).
    files = [("ca", tls.ca)]
    for name in [n.name for n in nodes] if tls.per_node else [""]:
        files += [(key, Path(path)) for key, path in tls.for_node(name).items() if key != "ca"]
    absent = [f"{key} {path}" for key, path in files if not path.is_file()]
    if absent:
        missing(f"{source}: tls files missing: {', '.join(absent)}; make the certificates with "
                "`kimi-cluster certs DIR --nodes NAME=ADDRESS,...` or remove 'tls' to run without it")
    return tls
