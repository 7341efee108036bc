"""Setting a cluster up: `plan` (where every expert would go, and the speed to expect), `probe` (this
machine's speed figures) and `certs` (TLS between the head and its workers)."""
from __future__ import annotations

import platform
import sys
from pathlib import Path

import yaml

from cluster.cli.options import add_cluster_args, cluster_config, gpu_choice, positive_int

GPU_HELP = ("the GPU the head's weights would go on, as `serve --gpu` picks it: auto (the first with room, if ggml "
            "has a GPU backend), none, cpu (the device path with the CPU standing in) or N (default %(default)s)")


def add_plan_parser(sub) -> None:
    p = sub.add_parser("plan", help="show how the experts would be spread over the machines",
                       description="Plan the placement of every routed expert by memory budget and print it "
                                   "(per node: experts per layer, their size, share of each layer; on the head "
                                   "also its own weights and KV cache; sizes in GiB), without loading anything. "
                                   "Exits 1 when the pool is too small. With --config, also checks that the nodes "
                                   "are the Ray config's machines and match their certificates (exits 2 if not); "
                                   "secrets not made yet are warned about, so it works as a dry run.")
    p.add_argument("model", help="path to the .gguf file (or its first part)")
    p.add_argument("--context", type=int, default=None,
                   help="plan the head's KV cache for this many tokens per sequence (default: the config's, else "
                        "the largest the head holds beside its experts, up to the model's own length)")
    p.add_argument("--max-sequences", type=int, default=None,
                   help="... and for this many sequences at once (default: the config's)")
    p.add_argument("--estimate", action="store_true",
                   help="also predict decode tokens/s (one stream and --streams) and prefill tokens/s from each "
                        "node's `speed` in the config (what `kimi-cluster probe` printed there); with --workers, "
                        "from this machine's probe, kept from an earlier one, else measured first (it says so and "
                        "how long it expects; the runtime's fixed costs, once measured, serve every model)")
    p.add_argument("--streams", type=positive_int, default=16,
                   help="streams for the batched estimate (default %(default)s)")
    p.add_argument("--prompt-tokens", type=positive_int, default=512,
                   help="prompt length for the prefill estimate (default %(default)s)")
    p.add_argument("--decode-context", type=positive_int, default=1024,
                   help="tokens of context the decode estimate assumes (default %(default)s)")
    p.add_argument("--gpu", type=gpu_choice, default="auto", metavar="auto|none|cpu|N",
                   help="as the head on this machine would use it, and measured for --estimate with --workers: "
                        + GPU_HELP)
    p.add_argument("--ray-config", metavar="FILE",
                   help="with --config: the Ray cluster config whose head_ip and worker_ips the nodes must match "
                        "(default: ~/ray_bootstrap_config.yaml, which `ray up` leaves on the head, else "
                        "ray-cluster.yaml beside the --config file)")
    add_cluster_args(p)
    p.set_defaults(func=cmd_plan)


def add_probe_parser(sub) -> None:
    p = sub.add_parser("probe", help="measure this machine's speed for a model, for `plan --estimate` and "
                                     "placement by speed",
                       description="Measure how fast this machine streams and computes each weight type the "
                                   "model uses, how fast it computes routed experts of the model's shape, and "
                                   "the runtime's fixed costs (alone, and with one and two local workers: starts "
                                   "Ray twice). Prints the figures as YAML to paste under this node in the "
                                   "cluster config, where `plan --estimate` and the placement (shares by speed) "
                                   "use them, and keeps them for `plan --estimate --workers N` here. Shows each "
                                   "phase's progress; took 69 s on an idle 2-core machine, 4.5 minutes with one core "
                                   "taken by other work (most of it the fixed costs, which do not depend on the "
                                   "model and are kept). Run "
                                   "it on each machine, idle: figures measured while other processes compute, or "
                                   "that come out as 0.0, are printed commented out and not kept, and it exits 1.")
    p.add_argument("model", help="path to the .gguf file (or its first part): only its header is read")
    p.add_argument("--gpu", type=gpu_choice, default="auto", metavar="auto|none|cpu|N", help="also measure " + GPU_HELP)
    p.add_argument("--head", metavar="HOST[:PORT]",
                   help="also measure this machine's round trip to the head (TCP handshakes to its Ray port, "
                        "6379, unless given), for round_trip_ms")
    p.set_defaults(func=cmd_probe)


def add_certs_parser(sub) -> None:
    p = sub.add_parser("certs", help="make a private CA and a certificate per node, for TLS between the head "
                                     "and its expert workers",
                       description="Write a private certificate authority (once; later runs reuse it) and a "
                                   "certificate and key per node into FOLDER. Workers then accept only a head "
                                   "with a certificate from this CA, and the head only workers with one. Keys are "
                                   "readable by their owner only. Point the cluster config's `tls` at the folder "
                                   "(the command prints the lines) and copy the folder to every node, at the same "
                                   "path. The CA's key goes to FOLDER-ca, beside it: keep that on this machine.")
    p.add_argument("folder", help="where to write ca.pem, NAME.pem and NAME-key.pem, the files every node gets; "
                                  "the CA's key goes to FOLDER-ca beside it, which stays here")
    p.add_argument("--nodes", required=True, metavar="NAME=ADDRESS,...",
                   help="every node, head included, by the name the cluster config's `nodes` give it and its "
                        "address (IP or host name), e.g. bigbox=192.168.1.10,worker-a=192.168.1.11")
    p.set_defaults(func=cmd_certs)


def cmd_plan(args) -> None:
    """Print where every expert would live, and whether the pool is big enough, without loading anything."""
    from cluster.config import ClusterConfig
    from cluster.head import ExpertCluster, local_budgets
    from cluster.placement import PlacementError
    missing_secrets: list[str] = []
    config = cluster_config(args, missing_secrets.append)
    check = _check_setup(args, config)
    for warning in missing_secrets + check.warnings:
        print(f"kimi-cluster: warning: {warning}", file=sys.stderr)
    for problem in check.problems:  # said first, and the plan shown all the same
        print(f"kimi-cluster: error: {problem}", file=sys.stderr)
    if config is None:  # one process on this machine
        given = {"model": args.model, "reserve_gb": args.reserve_gb, "allow_disk": bool(args.allow_disk),
                 "context": args.context, "max_sequences": args.max_sequences}
        config = ClusterConfig.from_dict({k: v for k, v in given.items() if v is not None}, "this machine")
    cluster = ExpertCluster(args.model, config, progress=False)
    here = args.workers or not args.config  # this machine's processes, not the config's machines
    if args.estimate and not here and not config.nodes:
        raise ValueError(f"--estimate needs the machines listed under 'nodes' in {config.source}, each with the "
                         "`speed` that `kimi-cluster probe` printed on it")
    if here:
        budgets = local_budgets(args.workers, args.worker_memory, args.head_memory)
    elif config.nodes:
        budgets = config.node_budgets()
    else:
        with cluster:
            budgets = [n.budget for n in cluster.nodes()]
    try:
        placement = cluster.plan(budgets)
    except PlacementError as e:
        print(e)
        sys.exit(1)
    print(placement.format_table())
    print("fits: every expert has a place" + (" (some paged from disk)" if placement.disk_backed else "")
          + (f"; {placement.replica_count} second copies of workers' experts" if placement.replicas else ""))
    print(f"the head's KV cache: {cluster.kv_plan.describe(cluster.model_config.context_length)}")
    for line in _gpu_lines(args.gpu, config, cluster.model_file):
        print(line)
    if args.estimate:
        from cluster.cost_model.estimate import ModelCost, estimate, gpu_use
        cost = ModelCost.from_model(cluster.model_file, cluster.model_config)
        speeds = _local_speeds(args, cost, budgets, cluster.model_file) if here else _config_speeds(config, cost)
        head_gpu = gpu_use(cost, speeds[placement.head_node].speed.gpu)
        if head_gpu:
            print(head_gpu)
        print(estimate(cost, placement, speeds, args.streams, args.prompt_tokens, args.decode_context).format())
        print("(an estimate: routing taken as uniform, figures as probed; expect the real figure within about 30%)")
    for agreed in check.checked:
        print(f"checked: {agreed}")
    if check.problems:
        sys.exit(2)


def _gpu_lines(choice, config, model_file) -> list[str]:
    """What GPUs would hold: the head's weights on this machine's (--gpu, as `serve` picks it), and the experts
    of workers with gpu_experts_gb."""
    from runtime.ggml_backends import choose_device
    from runtime.model import device_weight_bytes
    info, line = choose_device(choice, device_weight_bytes(model_file))
    lines = [f"GPU here: {line.split('; ', 1)[1]}" + (f" ({info})" if info is not None else "")]
    lines += [f"GPU of {n.name} (gpu: {n.gpu}): up to {n.gpu_experts_gb:g} GiB of its experts, the most routed first"
              for n in config.nodes if n.gpu_experts_gb]
    return lines


def _check_setup(args, config):
    """With --config: whether the Ray config's machines, the nodes and their certificates agree."""
    from cluster.setup_checks import SetupCheck, check_setup, find_ray_config
    if not args.config:
        return SetupCheck()
    return check_setup(config, find_ray_config(Path(args.config), args.ray_config))


def _local_speeds(args, cost, budgets, model_file) -> dict:
    """Head and --workers on this machine, with this machine's probe (kept from an earlier one, else run now), its
    GPU's too if the head would use one."""
    from cluster.cli.model_session import head_device
    from cluster.cost_model.estimate import NodeSpeed
    from cluster.cost_model.kept_probe import probe_here
    probed = probe_here(cost, say=_probe_says, device=head_device(args.gpu, model_file))
    for doubt in probed.doubts:
        print(f"kimi-cluster: warning: {doubt}: the figures are not final (not kept) and the estimate may be slow "
              "by as much; run `kimi-cluster probe MODEL` when the machine is idle", file=sys.stderr)
    speed = probed.speed
    worker_threads = max(1, speed.cores // (args.workers + 1))
    return {b.name: NodeSpeed("this machine", speed, speed.cores if b.is_head else worker_threads) for b in budgets}


def _config_speeds(config, cost) -> dict:
    from cluster.cost_model.estimate import NodeSpeed, check_probed_for
    missing = [n.name for n in config.nodes if n.speed is None]
    if missing:
        raise ValueError(f"no speed figures for {', '.join(missing)} in {config.source}: run `kimi-cluster probe "
                         "MODEL` on each of those machines and paste what it prints under the node")
    for node in config.nodes:
        check_probed_for(node.speed, cost, node.name)
    head = config.head_node
    return {n.name: NodeSpeed(n.address, n.speed, n.speed.cores, 0.0 if n is head else n.round_trip_ms, n.link_gbps)
            for n in config.nodes}


def _probe_says(line: str) -> None:
    print(f"kimi-cluster probe: {line}", file=sys.stderr, flush=True)


def cmd_probe(args) -> None:
    from cluster.cli.model_session import head_device
    from cluster.cost_model.estimate import ModelCost
    from cluster.cost_model.kept_probe import describe_seconds, probe_here
    from cluster.cost_model.probe import round_trip_ms
    from runtime.gguf_file import GGUFModelFile
    from runtime.model import checked_config
    model_file = GGUFModelFile(args.model)
    link = {"round_trip_ms": float(f"{round_trip_ms(args.head):.3g}")} if args.head else {}
    probed = probe_here(ModelCost.from_model(model_file, checked_config(model_file)), fresh=True, say=_probe_says,
                        device=head_device(args.gpu, model_file))
    _probe_says(f"took {describe_seconds(sum(probed.seconds.values()))}")
    figures = yaml.safe_dump({**link, "speed": probed.speed.to_dict()}, sort_keys=False,
                             default_flow_style=None).rstrip()
    if probed.doubts:
        # Commented out, so that figures skewed by other work are not pasted as this machine's.
        for doubt in probed.doubts:
            print(f"kimi-cluster: error: {doubt}", file=sys.stderr)
        print(f"# NOT FINAL ({'; '.join(probed.doubts)}), not kept: run `kimi-cluster probe` again when the "
              "machine is idle\n" + "\n".join(f"# {line}" for line in figures.splitlines()))
        sys.exit(1)
    print(f"# measured by `kimi-cluster probe` on {platform.node()} ({probed.speed.cores} cores); paste under this "
          "node in the cluster config,\n# with its link's bandwidth: link_gbps (GB/s; 10 GbE: 1.25)"
          + ("" if args.head else " and round_trip_ms (ping to the head, or probe with --head)"))
    print(figures)


def cmd_certs(args) -> None:
    from cluster.security.certs import (CA_CERT, CA_KEY, NODE_CERT, NODE_KEY, ca_key_folder, parse_nodes,
                                        write_certificates)
    folder = Path(args.folder).expanduser().absolute()
    nodes = parse_nodes(args.nodes)
    ca_key_was_inside = (folder / CA_KEY).exists()
    written = write_certificates(folder, nodes)
    print(f"wrote {', '.join(p.name for p in written if p.parent == folder)} in {folder}")
    copied, kept = _home_form(folder), _home_form(ca_key_folder(folder))
    # The nodes read the config's paths in their own homes: the ~ form holds on every node.
    print(f"in the cluster config:\ntls:\n  ca: {copied}/{CA_CERT}\n  cert: {copied}/{NODE_CERT}\n"
          f"  key: {copied}/{NODE_KEY}")
    print(f"then copy {copied} to every node at the same path (configs/ray-cluster.yaml's file_mounts do). "
          f"The CA's key is in {kept}: keep it on this machine only, to add nodes later")
    if ca_key_was_inside:
        print(f"moved {CA_KEY} out of {copied}, which is copied to every node: delete {copied}/{CA_KEY} on the "
              "nodes that got a copy earlier (`ray up` adds files but deletes none)")


def _home_form(path: Path) -> str:
    """`path` as ~/... when it is under the home folder, else whole."""
    home = Path.home()
    return f"~/{path.relative_to(home)}" if path.is_relative_to(home) and path != home else str(path)
