"""llama.cpp as a test oracle, run in a subprocess so that libllama never loads into the test process.

Protocol: `python -m tests.llama_oracle <command>` reads one JSON request on stdin and prints one JSON
reply on stdout. Each command is a function in COMMANDS; the Python wrappers below the dispatcher build
the request and parse the reply.

    tokenize  {"model", "texts": [str], "parse_special", "add_bos"} -> [[int]]   (llama_tokenize)
    pieces    {"model", "ids": [int]} -> [hex bytes]          (llama_token_to_piece, special=true)
    vocab     {"model"} -> {"n_vocab", "bos", "eos", "eog": [int], "add_bos"}
    chat      {"model", "messages": [{role, content}], "add_generation_prompt"} -> str
              (llama_chat_apply_template with the file's template: llama.cpp's built-in formatter)
    generate  {"model", "prompt": [int], "n", "repack", "forced": [int] | null, "flash"}
              -> {"tokens": [int], "logits": [[float]]}: greedy tokens, and the logits after the prompt
              and after each later token (fed greedily, or the `forced` ones); flash attention on or off;
              repack false selects llama.cpp's plain CPU kernels (no "extra" buffer types)
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

REPO_ROOT = Path(__file__).resolve().parent.parent


# ---- oracle side: runs inside the subprocess ----

def _load_vocab_only(model_path: str):
    import llama_cpp

    llm = llama_cpp.Llama(model_path=model_path, vocab_only=True, verbose=False)
    return llama_cpp, llm, llama_cpp.llama_model_get_vocab(llm.model)


def _tokenize(request: dict[str, Any]) -> list[list[int]]:
    _, llm, _ = _load_vocab_only(request["model"])
    return [llm.tokenize(text.encode(), add_bos=request["add_bos"], special=request["parse_special"])
            for text in request["texts"]]


def _pieces(request: dict[str, Any]) -> list[str]:
    import ctypes

    llama_cpp, _, vocab = _load_vocab_only(request["model"])
    pieces = []
    for token_id in request["ids"]:
        size = 64
        while True:
            buf = ctypes.create_string_buffer(size)
            n = llama_cpp.llama_token_to_piece(vocab, token_id, buf, size, 0, True)
            if n >= 0:
                break
            size = -n  # buffer too small: n is minus the size needed
        pieces.append(buf.raw[:n].hex())
    return pieces


def _vocab(request: dict[str, Any]) -> dict[str, Any]:
    llama_cpp, _, vocab = _load_vocab_only(request["model"])
    n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
    return {"n_vocab": n_vocab, "bos": llama_cpp.llama_vocab_bos(vocab), "eos": llama_cpp.llama_vocab_eos(vocab),
            "eog": [i for i in range(n_vocab) if llama_cpp.llama_vocab_is_eog(vocab, i)],
            "add_bos": bool(llama_cpp.llama_vocab_get_add_bos(vocab))}


def _chat(request: dict[str, Any]) -> str:
    import ctypes

    llama_cpp, llm, _ = _load_vocab_only(request["model"])
    template = llama_cpp.llama_model_chat_template(llm.model, None)
    keep = [(m["role"].encode(), m["content"].encode()) for m in request["messages"]]
    chat = (llama_cpp.llama_chat_message * len(keep))(*(llama_cpp.llama_chat_message(r, c) for r, c in keep))
    size = 4096
    while True:
        buf = ctypes.create_string_buffer(size)
        n = llama_cpp.llama_chat_apply_template(template, chat, len(keep), request["add_generation_prompt"],
                                                buf, size)
        if n < 0:
            raise RuntimeError("llama.cpp does not recognise this chat template")
        if n <= size:
            return buf.raw[:n].decode()
        size = n


def _generate(request: dict[str, Any]) -> dict[str, Any]:
    import llama_cpp
    import llama_cpp.llama as llama_module
    import numpy as np

    default_params = llama_cpp.llama_model_default_params

    def model_params():
        params = default_params()
        params.use_extra_bufts = request["repack"]
        return params
    llama_module.llama_cpp.llama_model_default_params = model_params
    forced = request.get("forced")
    n = request["n"] if forced is None else len(forced) + 1
    llm = llama_cpp.Llama(model_path=request["model"], n_ctx=len(request["prompt"]) + n + 1, n_threads=2,
                          logits_all=True, flash_attn=request["flash"], verbose=False)
    llm.eval(request["prompt"])
    tokens, logits = [], [np.array(llm.scores[llm.n_tokens - 1], np.float32)]
    for step in range(n):
        tokens.append(int(np.argmax(logits[-1])))
        if step == n - 1:
            break
        llm.eval([tokens[-1] if forced is None else forced[step]])
        logits.append(np.array(llm.scores[llm.n_tokens - 1], np.float32))
    return {"tokens": tokens, "logits": [row.tolist() for row in logits]}


COMMANDS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "tokenize": _tokenize, "pieces": _pieces, "vocab": _vocab, "chat": _chat, "generate": _generate,
}


def main(argv: list[str]) -> None:
    if len(argv) != 1 or argv[0] not in COMMANDS:
        sys.exit(f"usage: python -m tests.llama_oracle {{{'|'.join(COMMANDS)}}} < request.json")
    json.dump(COMMANDS[argv[0]](json.load(sys.stdin)), sys.stdout)


# ---- test side: wrappers that run the oracle ----

def run(command: str, request: dict[str, Any]) -> Any:
    result = subprocess.run([sys.executable, "-m", "tests.llama_oracle", command], input=json.dumps(request),
                            capture_output=True, text=True, cwd=REPO_ROOT)
    if result.returncode != 0:
        raise RuntimeError(f"llama.cpp oracle '{command}' failed (exit {result.returncode}):\n{result.stderr[-3000:]}")
    return json.loads(result.stdout)


def tokenize(model_path: str | Path, texts: list[str], parse_special: bool = True,
             add_bos: bool = False) -> list[list[int]]:
    return run("tokenize", {"model": str(model_path), "texts": texts, "parse_special": parse_special,
                            "add_bos": add_bos})


def pieces(model_path: str | Path, ids: list[int]) -> list[bytes]:
    return [bytes.fromhex(h) for h in run("pieces", {"model": str(model_path), "ids": ids})]


def vocab_info(model_path: str | Path) -> dict[str, Any]:
    return run("vocab", {"model": str(model_path)})


def chat(model_path: str | Path, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
    return run("chat", {"model": str(model_path), "messages": messages,
                        "add_generation_prompt": add_generation_prompt})


def generate(model_path: str | Path, prompt: list[int], n: int, repack: bool,
             forced: list[int] | None = None, flash: bool = True) -> dict[str, Any]:
    """llama.cpp's greedy tokens and its logits rows ([n, V] float32: after the prompt, then per token), with
    flash attention (as llama.cpp's own programs default to on the CPU) or without."""
    import numpy as np
    reply = run("generate", {"model": str(model_path), "prompt": prompt, "n": n, "repack": repack,
                             "forced": forced, "flash": flash})
    return {"tokens": reply["tokens"], "logits": np.array(reply["logits"], np.float32)}


if __name__ == "__main__":
    main(sys.argv[1:])
