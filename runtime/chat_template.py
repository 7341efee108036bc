"""Render a GGUF's tokenizer.chat_template (Jinja2) the way Hugging Face transformers renders it.

Same environment as transformers' apply_chat_template (trim_blocks + lstrip_blocks, loop controls, a
`tojson` that keeps non-ASCII text, the `raise_exception` / `strftime_now` helpers), except that lists
may be mutated: Kimi's templates queue tool-call ids with list.append / pop, which transformers'
immutable sandbox refuses. The sandbox still blocks access to Python internals.
"""
from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import SandboxedEnvironment


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=8)
def compile_chat_template(source: str) -> jinja2.Template:
    env = SandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ValueError(f"tokenizer.chat_template is not valid Jinja (line {e.lineno}: {e.message}); "
                         "fix the template in the GGUF or pass a corrected one") from None


def render_chat_template(source: str, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True,
                         bos_token: str = "", eos_token: str = "", **template_vars: Any) -> str:
    """messages: [{"role": "system" | "user" | "assistant" | "tool", "content": str, ...}, ...]."""
    try:
        return compile_chat_template(source).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                     bos_token=bos_token, eos_token=eos_token, **template_vars)
    except jinja2.exceptions.TemplateError as e:
        raise ValueError(f"the chat template rejected these messages: {e}") from None
