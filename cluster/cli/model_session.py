"""Bringing a model up for a command: in this process, or with its experts spread over a Ray cluster."""
from __future__ import annotations

import contextlib
import sys


@contextlib.contextmanager
def model_session(args, config, max_sequences: int, model_file=None, tokenizer=None, on_cluster=None):
    """(model, tokenizer, cluster, kv_plan): in this process (config None, cluster None), or with its experts
    spread over a Ray cluster (which plans for the config's max_sequences). kv_plan: the context each of
    max_sequences sequences gets (--context, else the largest the memory holds) and the KV memory for it.
    model_file and tokenizer: already opened ones to reuse (a real GGUF's header takes seconds).
    on_cluster: given the cluster before it starts, to watch it come up."""
    from runtime.ggml_ops import GgmlRunner
    from runtime.gguf_file import GGUFModelFile
    from runtime.model import KimiModel
    from runtime.tokenizer import Tokenizer
    model_file = model_file or GGUFModelFile(args.model)
    tokenizer = tokenizer or Tokenizer.from_metadata(model_file.metadata)
    device = head_device(args.gpu, model_file)
    on_device = experts_for_device(args.gpu_experts_gb, device, model_file, config)
    if config is None:
        from cluster.failover import available_memory_bytes
        available = available_memory_bytes()
        model = KimiModel(model_file, GgmlRunner(args.threads), progress=sys.stderr.isatty(),
                          repack=repack_that_fits(args.repack, model_file, available), device=device,
                          device_experts=on_device)
        kv_plan = _plan_here(model_file, model.config, available, max_sequences, args.context)
        if not _experts_fit(model_file, available):  # paged from disk: see ExpertShard.read_on_demand
            model.experts.read_on_demand(model_file)
        model.load(progress=sys.stderr.isatty())
        yield model, tokenizer, None, kv_plan
        return
    from cluster.head import ExpertCluster
    with ExpertCluster(args.model, config, local_workers=args.workers or 0, worker_memory_gb=args.worker_memory,
                       head_memory_gb=args.head_memory, repack=args.repack, worker_threads=args.threads,
                       progress=sys.stderr.isatty(), device=device) as cluster:
        if on_cluster is not None:
            on_cluster(cluster)
        model = cluster.start()
        print(cluster.placement.format_table(), file=sys.stderr)
        yield model, tokenizer, cluster, cluster.kv_plan


def head_device(choice: str | int, model_file):
    """The compute device --gpu asks for (None: the CPU alone), after one line on stderr that says which
    backends ggml has and what the head uses; a GPU that is missing or too small is an error in one line."""
    from runtime.ggml_backends import ComputeDevice, choose_device
    from runtime.model import device_weight_bytes
    info, line = choose_device(choice, device_weight_bytes(model_file))
    print(f"kimi-cluster: {line}", file=sys.stderr)
    return None if info is None else ComputeDevice(info)


def experts_for_device(gib: float, device, model_file, config) -> dict[int, list[int]] | None:
    """The routed experts --gpu-experts-gb copies onto the device: the most routed that fit in as many GiB, and in
    what the device has free beside the head's weights and buffers. Says how many in a line."""
    if not gib:
        return None
    if device is None or config is not None:
        raise ValueError("--gpu-experts-gb needs a GPU (--gpu) and every expert in this process (no --workers or "
                         "--config)")
    from cluster import routing_counts
    from cluster.placement import Inventory
    from runtime.ggml_backends import COMPUTE_RESERVE_BYTES, devices
    from runtime.model import checked_config, device_weight_bytes
    inventory = Inventory.from_model(model_file, checked_config(model_file))
    # The head's weights go on first (they load after this choice); then buffers for both kinds of graph.
    free = (devices()[device.info.index].free_bytes - device_weight_bytes(model_file)
            - 2 * COMPUTE_RESERVE_BYTES)
    budget = int(min(gib * 2**30, max(free, 0)))
    counts = routing_counts.load(model_file, inventory.expert_bytes.shape)
    chosen = routing_counts.hottest(counts, inventory.expert_bytes, budget)
    total = sum(int(inventory.expert_bytes[layer, e]) for layer, experts in chosen.items() for e in experts)
    print(f"kimi-cluster: {sum(map(len, chosen.values()))} routed experts ({total / 2**30:.1f} GiB, "
          f"{'the most routed' if counts is not None else 'as many of each layer: no routing counts kept yet'}) "
          f"go on {device.info.name} too", file=sys.stderr)
    return chosen


def _plan_here(model_file, model_config, available: int, max_sequences: int, context: int | None):
    from cluster.context_plan import plan_here
    from cluster.placement import Inventory
    from runtime.kv_cache import bytes_per_token
    inventory = Inventory.from_model(model_file, model_config)
    return plan_here(inventory, available, bytes_per_token=bytes_per_token(model_config),
                     max_sequences=max_sequences, model_context=model_config.context_length, context=context)


def repack_that_fits(repack: str, model_file, available_bytes: int | None = None) -> str:
    """Interleaved experts are copies in RAM. When they would not fit in this machine's free memory, read
    them in place instead (mapped pages, which the OS can drop and read again) rather than fail to load."""
    if repack not in ("experts", "all"):
        return repack
    if available_bytes is None:
        from cluster.failover import available_memory_bytes
        available_bytes = available_memory_bytes()
    if _experts_fit(model_file, available_bytes):
        return repack
    fallback = {"experts": "none", "all": "head"}[repack]
    print(f"kimi-cluster: the routed experts ({model_file.routed_expert_bytes() / 2**30:.1f} GiB) do not fit in "
          f"this machine's {available_bytes / 2**30:.1f} GiB of free memory, so they are read in place from the "
          f"file rather than interleaved (--repack {fallback})", file=sys.stderr)
    return fallback


def _experts_fit(model_file, available_bytes: int) -> bool:
    """Whether every routed expert fits in this much free memory (with a tenth to spare)."""
    return model_file.routed_expert_bytes() <= 0.9 * available_bytes
