"""Scripted models for the API tests (runtime/synthetic/scripted_model.py writes them): models whose weights make
them write a given reply to "What is the weather in Paris?", so that parsers meet a model's own tokens.

- caller: two parallel tool calls, get_weather {"city": "Paris"} then get_time {"zone": "UTC"};
- talker: "It is sunny in Paris." in words, and a get_weather call when the prompt starts one for it
  (tool_choice required: after "functions."; a named function: after its id);
- thinker (Kimi K2 Thinking's template): reasons "Paris is in France.", then calls get_weather.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator

import pytest

from runtime.ggml_ops import GgmlRunner
from runtime.gguf_file import GGUFModelFile
from runtime.model import KimiModel
from runtime.synthetic.demo_vocab import demo_tokenizer_metadata
from runtime.synthetic.scripted_model import spell, write_scripted_model
from runtime.tokenizer import Tokenizer
from tests.test_api import start_server, stop_server

SCRIPTED_CONTEXT = 1024  # the tools' declarations are long
QUESTION = "What is the weather in Paris?"
ASK = [{"role": "user", "content": QUESTION}]
SPOKEN = "It is sunny in Paris."
REASONING = "Paris is in France."
WEATHER_CALL = ("functions.get_weather:0", "get_weather", {"city": "Paris"})
TIME_CALL = ("functions.get_time:1", "get_time", {"zone": "UTC"})  # the model writes "get_time:1"; ids are minted


def write_scripted_models(folder: Path) -> dict[str, Path]:
    """caller, talker and thinker, written into `folder`."""
    paths = {}
    for template in ("instruct", "thinking"):
        tokenizer = Tokenizer.from_metadata(demo_tokenizer_metadata(template))

        def token(marker: str) -> int:
            return tokenizer.encode(marker, parse_special=True, add_bos=False)[0]
        begin, end, call, argument, call_end, im_end = (token(f"<|{name}|>") for name in (
            "tool_calls_section_begin", "tool_calls_section_end", "tool_call_begin", "tool_call_argument_begin",
            "tool_call_end", "im_end"))
        question = tokenizer.encode(tokenizer.apply_chat_template(ASK, add_generation_prompt=True), True)[-2:]
        weather = [call, "functions.get_weather:0", argument, '{"city": "Paris"}', call_end]
        if template == "thinking":
            scripts = {"thinker": [[*question, token("<think>"), REASONING, token("</think>"), begin, *weather, end,
                                    im_end]]}
        else:
            # The calls' ends differ: a model that follows its last two tokens writes whatever follows them.
            required = [begin, call, *tokenizer.encode("functions.", parse_special=False, add_bos=False)]
            named = tokenizer.encode("functions.get_weather:0", parse_special=False, add_bos=False) + [argument]
            scripts = {"caller": [[*question, begin, *weather, call, "get_time:1", argument, '{"zone": "UTC"}\n',
                                   call_end, end, im_end]],
                       "talker": [[*question, SPOKEN, im_end],
                                  [*required[-2:], "get_weather:0", argument, '{"city": "Paris"}', call_end, end,
                                   im_end],
                                  [*named[-2:], '{"city": "Paris"}', call_end, end, im_end]]}
        for name, texts in scripts.items():
            paths[name] = write_scripted_model(folder / f"{name}.gguf", spell(texts, tokenizer),
                                               chat_template=template)
    return paths


@pytest.fixture(scope="module")
def servers(tmp_path_factory) -> Iterator[dict[str, SimpleNamespace]]:
    """A server on each scripted model for one test module, with SCRIPTED_CONTEXT tokens of context."""
    with scripted_servers(write_scripted_models(tmp_path_factory.mktemp("scripted")), SCRIPTED_CONTEXT) as started:
        yield started


@contextlib.contextmanager
def scripted_servers(paths: dict[str, Path], context: int) -> Iterator[dict[str, SimpleNamespace]]:
    """An API server on each scripted model, stopped on the way out."""
    servers = {}
    try:
        for name, path in paths.items():
            model_file = GGUFModelFile(path)
            servers[name] = start_server(KimiModel(model_file, GgmlRunner(2), repack="none"),
                                         Tokenizer.from_metadata(model_file.metadata), context=context,
                                         max_sequences=4)
        yield servers
    finally:
        for server in servers.values():
            stop_server(server)
