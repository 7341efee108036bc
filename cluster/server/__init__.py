"""The HTTP server. Imports run one way: app -> each protocol (openai_api, openai_responses, anthropic_api) ->
what they share (chat_prompt, tool_use, structured_output, request_checks) -> service -> errors, metrics. A
protocol is a module with its routes, its paths and its error shape; app.py assembles them, and nothing below
a protocol imports one."""
