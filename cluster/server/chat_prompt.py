"""The prompt of a chat request, whatever its protocol: the tools checked, the conversation's tool calls numbered
(tool_use.py), the conversation rendered by the model file's chat template with its tools and tokenized, and the
reply's forced start appended; and what the reply then needs of it (its grammar, its banned tokens, the parser
of its tool calls)."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from cluster.server import structured_output, tool_use
from cluster.server.errors import ApiError
from cluster.server.service import Service
from cluster.server.tool_use import Tool, ToolChoice
from runtime.grammar import Grammar
from runtime.text_output import THINK_OPEN
from runtime.tool_calls import ToolCallMarkers, ToolCallParser


@dataclass
class ChatPrompt:
    tokens: list[int]  # the rendered conversation, then the forced start
    forced: list[int]  # the tokens the reply must start with (a forced tool call)
    tools: list[Tool]
    choice: ToolChoice
    tool_markers: ToolCallMarkers | None
    reasoning: tuple[int, int] | None  # the (<think>, </think>) ids when the template reasons
    in_reasoning: bool  # the template left <think> open
    earlier_calls: int  # tool calls in the conversation so far

    def banned_tokens(self) -> frozenset[int]:
        return tool_use.banned_tokens(self.tool_markers, self.choice)

    def tool_parser(self, service: Service, parallel: bool) -> ToolCallParser | None:
        return tool_use.parser(service, self.tools, self.tool_markers, self.choice, parallel, self.earlier_calls)

    async def grammar(self, service: Service, answer_schema: dict[str, Any] | None, parallel: bool) -> Grammar | None:
        return await asyncio.to_thread(structured_output.reply_grammar, service, answer_schema, self.tools,
                                       self.choice, parallel, self.tool_markers, self.reasoning, self.in_reasoning,
                                       self.forced)


async def chat_prompt(service: Service, conversation: list[dict], tools: list[Tool], choice: ToolChoice,
                      reasoning: tuple[int, int] | None, param: str = "messages") -> ChatPrompt:
    """conversation: the chat template's messages (OpenAI's shape); param: the request field that holds it,
    named in a 400 when the template refuses it."""
    tool_use.check_tools(tools, choice, "tools", "tool_choice")
    found = tool_use.markers(service, tools)
    conversation, earlier_calls = tool_use.number_calls(conversation)
    rendered = await asyncio.to_thread(_render, service, conversation, tool_use.template_tools(tools), param)
    tokens = await asyncio.to_thread(service.tokenizer.encode, rendered, True)
    in_reasoning = rendered.rstrip().endswith(THINK_OPEN)
    forced = tool_use.forced_start(service, tools, found, choice, reasoning[1] if in_reasoning else None)
    return ChatPrompt(tokens + forced, forced, tools, choice, found, reasoning, in_reasoning, earlier_calls)


def _render(service: Service, conversation: list[dict], tools: list[dict] | None, param: str) -> str:
    try:
        return service.tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tools=tools)
    except ValueError as e:
        raise ApiError(400, str(e), param=param) from None
