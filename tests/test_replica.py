"""Kimi K2.6's sparse replica: the real file set's layout, sizes and vocabulary, in a few MB of disk."""
from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest
import ray
from gguf import GGMLQuantizationType as T

from cluster.config import ClusterConfig
from cluster.head import ExpertCluster
from cluster.placement import GiB
from runtime.engine import Engine
from runtime.gguf_file import GGUFModelFile
from runtime.model import checked_config
from runtime.tokenizer import Tokenizer
from tests.ray_clusters import add_node, start_cluster

# Kimi's special tokens at their ids in the real 163,840-token vocabulary (KIMI_GGUF.md, section 4).
REAL_SPECIAL_IDS = {"[BOS]": 163584, "[EOS]": 163585, "<|im_end|>": 163586, "<|im_user|>": 163587,
                    "<|im_assistant|>": 163588, "<|im_system|>": 163594, "<|tool_calls_section_begin|>": 163595,
                    "<|tool_call_begin|>": 163597, "<|im_middle|>": 163601, "<think>": 163606, "</think>": 163607,
                    "[UNK]": 163838, "[PAD]": 163839}


def test_the_replica_reads_back_as_kimi_k2_6(replica):
    model_file = GGUFModelFile(replica)
    assert [p.name for p in model_file.paths] == [f"Kimi-K2.6-UD-Q2_K_XL-{i:05d}-of-00008.gguf" for i in range(1, 9)]
    config = checked_config(model_file)
    assert (config.num_layers, config.num_dense_layers, config.n_embd, config.num_experts, config.n_ff_expert,
            config.num_experts_used, config.kv_lora_rank, config.q_lora_rank) == (61, 1, 7168, 384, 2048, 8, 512, 1536)
    assert len(model_file.tensors) == model_file.metadata["split.tensors.count"] == 1096
    experts = [t for name, t in model_file.tensors.items() if name.endswith("_exps.weight")]
    assert len(experts) == 180 and {t.ggml_type for t in experts} == {T.Q2_K}
    assert experts[0].ne == (7168, 2048, 384)
    assert model_file.tensors["token_embd.weight"].ne == (7168, 163840)

    sizes = [p.stat() for p in model_file.paths]
    assert 330e9 < sum(s.st_size for s in sizes) < 350e9, "the real UD-Q2_K_XL set is about 340 GB"
    assert sum(s.st_blocks * 512 for s in sizes) < 50e6, "the tensor data is file holes"
    assert max(s.st_size for s in sizes) < 1.2 * min(s.st_size for s in sizes), "parts of about equal size"

    tokenizer = Tokenizer.from_metadata(model_file.metadata)
    assert tokenizer.vocab_size == 163_840
    assert {text: tokenizer.encode(text) for text in REAL_SPECIAL_IDS} == {t: [i] for t, i in REAL_SPECIAL_IDS.items()}
    assert (tokenizer.bos_id, tokenizer.eos_id) == (163584, 163586)
    text = "Hello, Kimi! Mixture-of-experts models route each token to 8 of 384 experts. 日本語"
    ids = tokenizer.encode(text, parse_special=False)
    assert tokenizer.decode(ids) == text and max(ids) < 163584 and len(ids) < 0.7 * len(text.encode())


def test_inspect_and_plan_on_the_replica(replica, tmp_path):
    inspect = subprocess.run([sys.executable, "-m", "cluster.cli", "inspect", str(replica)],
                             capture_output=True, text=True, timeout=120)
    assert inspect.returncode == 0, inspect.stderr
    assert "and 7 more parts" in inspect.stdout and "vocab: 163840 tokens" in inspect.stdout
    config = tmp_path / "cluster.yaml"
    config.write_text("nodes:\n" + "".join(
        f"  - {{name: n{i}, address: 10.0.0.{i + 1}, memory_gb: 128{', head: true' if i == 0 else ''}}}\n"
        for i in range(4)) + "token_file: null\n")

    def plan(*flags):
        return subprocess.run([sys.executable, "-m", "cluster.cli", "plan", str(replica), "--config", str(config),
                               *flags], capture_output=True, text=True, timeout=120)

    fixed = plan("--context", "4096")
    assert fixed.returncode == 0, fixed.stderr
    assert "60 MoE layers over 4 nodes" in fixed.stdout and "fits: every expert has a place" in fixed.stdout
    # K2.6's MLA cache in F16: 61 layers x (512 latent + 64 rope) x 2 bytes a token
    assert ("the head's KV cache: 4096 tokens of context (--context) x 16 sequences, at 68.6 KiB per token: "
            "4.3 GiB of KV cache on the head") in fixed.stdout
    # By default, the most the head holds beside its share of the experts (all it has left at 4096 tokens).
    automatic = plan()
    found = re.search(r"the head's KV cache: (\d+) tokens of context \(the most the head holds, up to the model's "
                      r"131072; --context sets it\) x 16 sequences", automatic.stdout)
    assert automatic.returncode == 0 and found, automatic.stdout + automatic.stderr
    context = int(found.group(1))
    assert context > 4096 and context % 1024 == 0
    kv_bytes = 16 * 61 * (512 + 64) * 2
    head_left = re.search(r"kept prompts share its ([\d.]+) GiB of KV memory", fixed.stdout).group(1)
    assert context == 4096 + (float(head_left) * 2**30 - 4096 * kv_bytes) // kv_bytes // 1024 * 1024
    # Two sequences (an agent's setting) get the model's whole context.
    assert "131072 tokens of context (the most the head holds" in plan("--max-sequences", "2").stdout


@pytest.mark.slow
def test_the_replica_generates_on_a_multi_node_cluster(replica):
    """Kimi K2.6's widths end to end: the head's 9 GiB of attention and embeddings, 3 worker nodes paging
    their experts from the sparse files (allow_disk), hidden states over gRPC, 163,840 logits."""
    cluster = start_cluster(num_cpus=1, memory=12 * GiB)  # the head holds everything but routed experts
    try:
        for _ in range(3):
            add_node(cluster, num_cpus=1, memory=2 * GiB)
        cluster.wait_for_nodes(timeout=120)
        ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False, _node_ip_address="127.0.0.1")
        config = ClusterConfig.from_dict({"model": str(replica), "reserve_gb": 0, "allow_disk": True, "context": 64,
                                          "max_sequences": 1}, "test")
        with ExpertCluster(replica, config, repack="none", progress=False) as experts:
            model = experts.start()
            assert experts.placement.disk_backed and len(experts.workers) == 3
            prompt = [REAL_SPECIAL_IDS["<|im_user|>"], 300, 301, REAL_SPECIAL_IDS["<|im_middle|>"]]
            tokens = list(Engine(model, context_size=64).generate(prompt, 3))
            # Every weight is zero, so every logit is: greedy takes the lowest id.
            assert tokens == [0, 0, 0]
            routed = experts.remote.routed
            serving = {owner for layer in range(1, 61) for expert in np.flatnonzero(routed[layer])
                       for owner in experts.placement.owners(layer, int(expert))}
            assert set(experts.workers) <= serving, "every worker computed experts"
            assert routed[1:].sum() == 60 * 8 * (len(prompt) + 2)  # 8 experts a token in every MoE layer
            assert experts.status()["down"] == {}
    finally:
        ray.shutdown()
        cluster.shutdown()
