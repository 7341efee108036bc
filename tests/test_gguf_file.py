"""Opening GGUF files: the tensor index, split sets, expert byte ranges, and one clear error per broken case."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFValueType

from runtime.config import ModelConfig
from runtime.gguf_file import GGUFError, GGUFModelFile
from runtime.model import KimiModel
from tests.gguf_tools import edit_in_place, rewrite_gguf


def load(path):
    return KimiModel(GGUFModelFile(path))


@pytest.fixture
def broken_copy(tiny_q4km, tmp_path):
    dst = tmp_path / "model.gguf"
    shutil.copy(tiny_q4km, dst)
    return dst


def test_index_matches_reader_and_config(tiny_q4km):
    f = GGUFModelFile(tiny_q4km)
    config = ModelConfig.from_metadata(f.metadata)
    assert f.architecture == "deepseek2"
    assert config.num_layers == 3 and config.num_dense_layers == 1 and config.num_experts == 16
    assert config.is_mla and config.gating_func == 2 and config.expert_weights_norm
    # 3 globals + 13 dense-layer tensors + 18 per MoE layer, as in real Kimi files (1096 = 3 + 13 + 60 * 18).
    assert len(f.tensors) == 3 + 13 + 2 * 18
    types = {info.ggml_type for info in f.tensors.values()}
    assert {GGMLQuantizationType.Q4_K, GGMLQuantizationType.Q6_K, GGMLQuantizationType.F32} <= types


def test_expert_byte_ranges_tile_the_tensor(tiny_q4km):
    f = GGUFModelFile(tiny_q4km)
    for kind in ("gate", "up", "down"):
        info = f.info(f"blk.1.ffn_{kind}_exps.weight")
        ranges = [f.expert_range(1, e, kind) for e in range(16)]
        assert ranges[0].offset == info.offset
        assert all(b.offset == a.offset + a.nbytes for a, b in zip(ranges, ranges[1:]))
        assert sum(r.nbytes for r in ranges) == info.nbytes
        # Expert 5's range holds exactly the rows of expert 5 in the full tensor.
        full = f.raw(info.name).reshape(16, -1)
        assert np.array_equal(f.byte_view(ranges[5]), full[5])
    assert f.expert_bytes(1, 0) == sum(f.expert_range(1, 0, k).nbytes for k in ("gate", "up", "down"))


def test_split_set_opens_from_first_part(tiny_q4km, tmp_path):
    first = rewrite_gguf(tiny_q4km, tmp_path / "kimi.gguf", split_parts=3)
    assert first.name == "kimi-00001-of-00003.gguf"
    split, single = GGUFModelFile(first), GGUFModelFile(tiny_q4km)
    assert len(split.paths) == 3
    assert {i.shard for i in split.tensors.values()} == {0, 1, 2}
    assert split.tensors.keys() == single.tensors.keys()
    for name in single.tensors:
        assert np.array_equal(split.raw(name), single.raw(name))


def test_not_gguf(tmp_path):
    path = tmp_path / "notes.gguf"
    path.write_text("this is not a model")
    with pytest.raises(GGUFError, match="not a GGUF file"):
        GGUFModelFile(path)


def test_truncated_header(broken_copy):
    data = broken_copy.read_bytes()
    broken_copy.write_bytes(data[:200])
    with pytest.raises(GGUFError, match="the file is truncated or corrupt"):
        GGUFModelFile(broken_copy)


def test_truncated_data(broken_copy):
    data = broken_copy.read_bytes()
    broken_copy.write_bytes(data[: len(data) * 9 // 10])
    with pytest.raises(GGUFError, match=r"tensor '.*' needs bytes up to .* truncated"):
        GGUFModelFile(broken_copy)


def test_tensor_offset_past_end_of_file(broken_copy):
    moved = []

    def move_first_tensor(reader):
        reader.tensors[0].field.parts[-1][0] = 1 << 40
        moved.append(reader.tensors[0].name)
    edit_in_place(broken_copy, move_first_tensor)
    with pytest.raises(GGUFError, match=f"tensor '{moved[0]}' needs bytes up to"):
        GGUFModelFile(broken_copy)


def test_missing_split_part(tiny_q4km, tmp_path):
    first = rewrite_gguf(tiny_q4km, tmp_path / "kimi.gguf", split_parts=3)
    (tmp_path / "kimi-00002-of-00003.gguf").unlink()
    with pytest.raises(GGUFError, match="missing part 2 of 3"):
        GGUFModelFile(first)


def test_opening_a_later_split_part(tiny_q4km, tmp_path):
    rewrite_gguf(tiny_q4km, tmp_path / "kimi.gguf", split_parts=3)
    with pytest.raises(GGUFError, match="open the first part"):
        GGUFModelFile(tmp_path / "kimi-00002-of-00003.gguf")


def test_unknown_architecture(broken_copy):
    def rename_arch(reader):
        field = reader.fields["general.architecture"]
        field.parts[field.data[0]][-1] = ord("9")  # deepseek2 -> deepseek9, same length
    edit_in_place(broken_copy, rename_arch)
    with pytest.raises(GGUFError, match="architecture 'deepseek9' is not supported"):
        GGUFModelFile(broken_copy)


def test_missing_required_key(tiny_q4km, tmp_path):
    path = rewrite_gguf(tiny_q4km, tmp_path / "m.gguf", drop_keys={"deepseek2.attention.kv_lora_rank"})
    with pytest.raises(GGUFError, match="required metadata key 'deepseek2.attention.kv_lora_rank' is missing"):
        load(path)


def test_missing_tensor(tiny_q4km, tmp_path):
    path = rewrite_gguf(tiny_q4km, tmp_path / "m.gguf", drop_tensors={"blk.2.ffn_up_exps.weight"})
    with pytest.raises(GGUFError, match="required tensor 'blk.2.ffn_up_exps.weight' is missing"):
        load(path)


def test_shape_disagrees_with_metadata(tiny_q4km, tmp_path):
    path = rewrite_gguf(tiny_q4km, tmp_path / "m.gguf",
                        set_keys={"deepseek2.expert_count": (32, GGUFValueType.UINT32)})
    with pytest.raises(GGUFError, match="has shape .* but the metadata implies"):
        load(path)


def test_type_this_build_cannot_compute(broken_copy):
    def make_router_int8(reader):
        # An F32 router of 16 x 256 becomes I8: still inside the file, but no kernel computes it.
        tensor = next(t for t in reader.tensors if t.name == "blk.1.ffn_gate_inp.weight")
        tensor.field.parts[-2][0] = int(GGMLQuantizationType.I8)
    edit_in_place(broken_copy, make_router_int8)
    with pytest.raises(GGUFError, match="is I8, a type this build cannot compute"):
        load(broken_copy)


def test_unknown_type_id(broken_copy):
    def corrupt_type(reader):
        reader.tensors[1].field.parts[-2][0] = 250
    edit_in_place(broken_copy, corrupt_type)
    with pytest.raises(GGUFError, match="ggml type id 250, which this build does not know"):
        GGUFModelFile(broken_copy)


def test_cli_reports_a_broken_file_in_one_line(broken_copy):
    broken_copy.write_bytes(broken_copy.read_bytes()[:200])
    result = subprocess.run([sys.executable, "-m", "cluster.cli", "generate", str(broken_copy), "--prompt", "hi"],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("kimi-cluster: error:") and "the file is truncated" in result.stderr


@pytest.mark.parametrize("contents, words", [
    (b"", "is empty (0 bytes): the download or copy did not finish; download the file again"),
    (b"GGU", "is 3 bytes long, too short for a GGUF header: the file is truncated; download it again"),
    (b"GGUF\x03\x00\x00\x00", "is 8 bytes long, too short for a GGUF header"),
    (b"hello", "is not a GGUF file (it starts with b'hell'"),
])
def test_a_short_or_empty_file_says_so_in_our_words(tmp_path, capsys, contents, words):
    from cluster.cli.main import main
    path = tmp_path / "model.gguf"
    path.write_bytes(contents)
    assert main(["inspect", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"kimi-cluster: error: {path}: ") and words in err, err
    assert not re.search(r"\w+(Error|Exception)\b", err), "no exception class names"


def test_fused_gate_up_experts_have_the_same_bytes(tiny_q4km, tmp_path):
    fused = GGUFModelFile(rewrite_gguf(tiny_q4km, tmp_path / "fused.gguf", fuse_gate_up=True))
    plain = GGUFModelFile(tiny_q4km)
    assert fused.expert_kinds(1) == ("gate_up", "down")
    for expert in (0, 7, 15):
        assert fused.expert_bytes(1, expert) == plain.expert_bytes(1, expert)
        gate_up = fused.byte_view(fused.expert_range(1, expert, "gate_up"))
        gate, up = (plain.byte_view(plain.expert_range(1, expert, k)) for k in ("gate", "up"))
        assert np.array_equal(gate_up, np.concatenate([gate, up]))


U32, STR, F32 = GGUFValueType.UINT32, GGUFValueType.STRING, GGUFValueType.FLOAT32


@pytest.mark.parametrize("key, value, value_type, words", [
    ("deepseek2.block_count", 2**31 - 1, U32, "'deepseek2.block_count' is 2147483647; it must be an integer from 1 to 512"),
    ("deepseek2.block_count", "three", STR, "'deepseek2.block_count' is 'three'; it must be an integer"),
    ("deepseek2.block_count", 2.5, F32, "'deepseek2.block_count' is 2.5; it must be an integer"),
    ("deepseek2.block_count", 0, U32, "'deepseek2.block_count' is 0; it must be an integer from 1"),
    ("deepseek2.expert_used_count", 99, U32, "the metadata uses 99 of 16 experts, which cannot be"),
    ("deepseek2.expert_gating_func", 7, U32, "'deepseek2.expert_gating_func' is 7; it must be an integer from 1 to 2"),
    ("deepseek2.attention.layer_norm_rms_epsilon", "tiny", STR, "must be a finite number"),
    ("tokenizer.ggml.eos_token_id", "x", STR, "tokenizer.ggml.eos_token_id is 'x', not an id in the 2891-token"),
])
def test_metadata_of_the_wrong_type_or_range_is_named(tiny_q4km, tmp_path, key, value, value_type, words, capsys):
    """Checked before anything uses it: a layer count of 2^31 once made the tensor check run for hours."""
    from cluster.cli.main import main
    path = rewrite_gguf(tiny_q4km, tmp_path / "bad.gguf", set_keys={key: (value, value_type)})
    assert main(["inspect", str(path)]) == 2
    err = capsys.readouterr().err
    assert words in err and "invalid literal" not in err, err
