"""OpenAI's shapes at the ingress: requests to engine inputs (``inputs``, used by the
LLMServer where the tokenizer is), engine deltas to chat and completion objects (``outputs``),
and tool calls parsed out of the answer's text, whole or streamed (``tool_calls``,
``tool_call_stream``)."""
