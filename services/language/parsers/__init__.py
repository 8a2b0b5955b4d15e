"""Parsers of the model's output text: reasoning (`<think>`), Qwen3 tool calls, and the per-choice
parser that combines them (`chat_output`).

May import `errors`, `engine` types and the standard library only."""
