"""What the README tells a new user holds: its commands exist and take the options it gives them, and what
it says of the demo model and the presets is what the code does."""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

from cluster.cli.main import build_parser
from cluster.cli.model_files import REPLICA_PRESET
from runtime.synthetic.demo_model import PRESETS
from runtime.synthetic.demo_vocab import demo_tokenizer_metadata

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def test_the_download_commands_parse_with_the_installed_hf_cli(tmp_path):
    commands = re.findall(r"hf download [^`;]+", " ".join(README.split()))  # commands may wrap in the text
    assert commands and "huggingface-cli" not in README  # current huggingface_hub no longer installs it
    hf = Path(sys.executable).with_name("hf")
    for command in commands:
        args = [arg.replace("/models/kimi", str(tmp_path)) for arg in shlex.split(command)[1:]]
        # Offline, a command that parses stops at the network; a usage error exits 2 before that.
        result = subprocess.run([str(hf), *args], capture_output=True, text=True, timeout=120,
                                env={**os.environ, "HF_HUB_OFFLINE": "1", "NO_COLOR": "1"})
        assert result.returncode != 2 and "offline mode" in result.stdout + result.stderr, (command, result.stderr)


def test_the_demo_vocabulary_is_described_as_it_is():
    tokens = demo_tokenizer_metadata()["tokenizer.ggml.tokens"]
    assert f"byte-level BPE of {len(tokens):,} tokens" in README


def test_every_make_model_preset_is_documented():
    listed = re.search(r"--preset ([\w|\\.-]+)\]", README)[1].replace("\\", "").split("|")
    choices = next(a for a in build_parser()._subparsers._group_actions[0].choices["make-model"]._actions
                   if a.dest == "preset").choices
    assert listed == list(choices) == [*PRESETS, REPLICA_PRESET]
