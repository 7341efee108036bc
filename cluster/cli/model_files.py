"""Model files: `inspect` (what a GGUF holds, checked) and `make-model` (random models in the Kimi layout, and
the sparse replica of Kimi K2.6's file set)."""
from __future__ import annotations

REPLICA_PRESET = "k2.6-replica"


def add_inspect_parser(sub) -> None:
    p = sub.add_parser("inspect", help="show a model's metadata, tensor types and sizes",
                       description="Check a GGUF model and show what it holds: its architecture and widths, "
                                   "experts, context and tokenizer, the bytes of each tensor type, and how much is "
                                   "routed experts (spread over the nodes) and how much stays on the head. Reads "
                                   "the header only, so it takes seconds even for a split set of hundreds of GiB; "
                                   "a damaged or incomplete file is named in one line, with what to do.")
    p.add_argument("model", help="path to the .gguf file (or its -00001-of-0000N.gguf part)")
    p.set_defaults(func=cmd_inspect)


def add_make_model_parser(sub) -> None:
    p = sub.add_parser("make-model", help="write a random model in the Kimi K2 GGUF layout, or a sparse replica "
                                          "of Kimi K2.6's 319 GiB file set",
                       description="Write a random model with Kimi K2's layout and tokenizer, for tests and "
                                   "benchmarks; --quant uses llama.cpp's quantizer (needs llama-cpp-python). "
                                   f"--preset {REPLICA_PRESET} --sparse writes Kimi K2.6's real UD-Q2_K_XL file set "
                                   "(8 parts, real metadata, shapes and a 163,840-token vocabulary) with every "
                                   "tensor left as a file hole: 319 GiB that read as zeros, in a few MiB of disk.")
    p.add_argument("out", help="output .gguf path (for a split set, its parts are named <out>-0000N-of-00008.gguf)")
    p.add_argument("--preset", default="tiny", choices=["tiny", "small", "k2-depth", "k2-slice", REPLICA_PRESET],
                   help="tiny: 256 wide, for tests; small: 1024 wide, 32 experts; k2-depth: K2's 61 layers and "
                        "384 experts at tiny widths, for the framework's cost per layer; k2-slice: K2's real "
                        f"widths, 3 layers, 16 experts; {REPLICA_PRESET}: the real model's size, with --sparse "
                        "(default %(default)s)")
    p.add_argument("--sparse", action="store_true",
                   help="write headers only, tensor data as file holes (zeros); only with the replica preset")
    p.add_argument("--quant", default=None, help="quantize, e.g. Q8_0, Q4_K_M, Q2_K (default: unquantized)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the weights (default %(default)s)")
    p.set_defaults(func=cmd_make_model)


def cmd_inspect(args) -> None:
    """Print what the file holds, once its header, tensors and tokenizer have been checked (no tensor data read)."""
    from cluster.placement import format_bytes
    from runtime.gguf_file import GGUFModelFile
    from runtime.model import checked_config
    from runtime.tokenizer import Tokenizer
    model_file = GGUFModelFile(args.model)
    config = checked_config(model_file)
    tokenizer = Tokenizer.from_metadata(model_file.metadata)
    parts = f" and {len(model_file.paths) - 1} more parts" if len(model_file.paths) > 1 else ""
    print(f"file: {model_file.paths[0]}{parts}  ({format_bytes(model_file.file_bytes)})")
    print(f"architecture: {model_file.architecture}  name: {model_file.metadata.get('general.name', '?')}")
    print(f"layers: {config.num_layers} ({config.num_dense_layers} dense)  n_embd: {config.n_embd}  "
          f"heads: {config.num_heads}  q_lora: {config.q_lora_rank}  kv_lora: {config.kv_lora_rank}  "
          f"head dims qk/rope/v: {config.head_dim_qk}/{config.rope_dim}/{config.head_dim_v}  "
          f"attention: {'MLA (absorbed)' if config.is_mla else 'legacy kv_b'}")
    print(f"experts: {config.num_experts} routed, {config.num_experts_used} used, {config.num_shared_experts} "
          f"shared, n_ff {config.n_ff_expert}  gating: {'sigmoid' if config.gating_func == 2 else 'softmax'}  "
          f"scale: {config.expert_weights_scale:.4g}  groups: {config.num_expert_groups}")
    print(f"context: {config.context_length}  rope: {config.rope_scaling_type} x{config.rope_factor:g} "
          f"base {config.rope_base:g}  vocab: {config.vocab_size} tokens ({tokenizer.vocab_size} in the tokenizer, "
          f"pre-tokenizer {model_file.metadata.get('tokenizer.ggml.pre')}, "
          f"chat template {'yes' if tokenizer.chat_template else 'none'})")
    by_type: dict[str, list[int]] = {}
    for info in model_file.tensors.values():
        entry = by_type.setdefault(info.ggml_type.name, [0, 0])
        entry[0] += 1
        entry[1] += info.nbytes
    expert_bytes = model_file.routed_expert_bytes()
    other_bytes = sum(info.nbytes for info in model_file.tensors.values()) - expert_bytes
    print("tensor types:")
    for name, (count, nbytes) in sorted(by_type.items(), key=lambda kv: -kv[1][1]):
        print(f"  {name:8s} {count:5d} tensors  {format_bytes(nbytes):>10s}")
    print(f"routed experts: {format_bytes(expert_bytes)}   everything else (head node): {format_bytes(other_bytes)}")
    print("checked: every tensor the model reads is present, with the shape the metadata implies and a type "
          "ggml computes; the tokenizer loads")


def cmd_make_model(args) -> None:
    from cluster.placement import format_bytes
    from runtime.synthetic.demo_model import make_model
    from runtime.synthetic.replica_model import write_sparse_replica
    if args.sparse and args.preset != REPLICA_PRESET:
        raise ValueError(f"--sparse writes the {REPLICA_PRESET} preset only (the others are small and written with "
                         f"random weights): add --preset {REPLICA_PRESET}, or drop --sparse")
    if args.preset == REPLICA_PRESET and not args.sparse:
        raise ValueError(f"--preset {REPLICA_PRESET} is 319 GiB: it is only written sparse (headers, with the tensor "
                         "data left as file holes); add --sparse")
    if args.sparse:
        if args.quant:
            raise ValueError(f"--quant does not apply to --preset {REPLICA_PRESET}: its types are Unsloth's "
                             "UD-Q2_K_XL recipe (see `kimi-cluster inspect` on the result)")
        paths = write_sparse_replica(args.out, seed=args.seed)
        apparent, on_disk = (sum(getattr(p.stat(), key) for p in paths) for key in ("st_size", "st_blocks"))
        print(f"wrote {paths[0]} and {len(paths) - 1} more parts: {format_bytes(apparent)} of tensors, zeros but "
              f"for the routers' biases, in {format_bytes(on_disk * 512)} of disk")
        return
    path = make_model(args.out, preset=args.preset, quant=args.quant, seed=args.seed)
    print(f"wrote {path} ({format_bytes(path.stat().st_size)})")
