"""Which OpenAI request fields this server refuses, and the checks of `tools` / `tool_choice`.

An OpenAI field that would change the output but is not implemented gets a 400 naming it rather
than being dropped silently (a client asking for audio must not get text as if it had none).
Tools are validated here but kept as the client sent them: the chat template renders them with
`tojson`, so any rewrite (key order, defaults) would change the prompt.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from services.language.errors import BadRequestError

# Field -> what to do instead. Checked when the field is set (not null).
_UNSUPPORTED = {
    "audio": "audio output is not supported; remove audio",
    "functions": "the legacy functions field is not supported; send tools instead",
    "function_call": "the legacy function_call field is not supported; send tool_choice instead",
    "prediction": "predicted outputs are not supported; remove prediction",
    "web_search_options": "web search is not supported; remove web_search_options",
}


def check_fields(body: Any) -> list[str]:
    """Refuse unsupported output-changing fields; return the names of unknown ones."""
    for name, advice in _UNSUPPORTED.items():
        if getattr(body, name, None) is not None:
            raise BadRequestError(f"{name}: {advice}", param=name)
    modalities = getattr(body, "modalities", None)
    if modalities is not None and modalities != ["text"]:
        raise BadRequestError(
            f'modalities {modalities} are not supported; this server only outputs ["text"]',
            param="modalities",
        )
    verbosity = getattr(body, "verbosity", None)
    if verbosity not in (None, "medium"):
        raise BadRequestError(
            f"verbosity {verbosity!r} is not supported; remove it (the model has one verbosity)",
            param="verbosity",
        )
    best_of = getattr(body, "best_of", None)
    if best_of is not None and best_of != 1 and best_of != getattr(body, "n", 1):
        raise BadRequestError("best_of is not supported; use n", param="best_of")
    return body.unknown_fields()


class _FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class _ToolParam(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: str
    function: _FunctionDefinition


def validate_tools(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    """The tools as sent, after checking each is a function tool with a name."""
    if not tools:
        return tools
    names = set()
    for index, tool in enumerate(tools):
        param = f"tools[{index}]"
        try:
            parsed = _ToolParam.model_validate(tool)
        except ValidationError as exc:
            error = exc.errors()[0]
            where = ".".join(str(part) for part in error.get("loc", ()))
            raise BadRequestError(f"{param}.{where}: {error.get('msg')}", param=param) from exc
        if parsed.type != "function":
            raise BadRequestError(
                f"{param}.type {parsed.type!r} is not supported; only function tools are",
                param=f"{param}.type",
            )
        if not parsed.function.name or parsed.function.name in names:
            raise BadRequestError(
                f"{param}.function.name must be a unique non-empty name",
                param=f"{param}.function.name",
            )
        names.add(parsed.function.name)
    return tools


def validate_tool_choice(choice: str | dict[str, Any] | None) -> None:
    """`none`, `auto`, `required` or `{"type": "function", "function": {"name": ...}}`."""
    if choice is None or choice in ("none", "auto", "required"):
        return
    function = choice.get("function") if isinstance(choice, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if (
        not isinstance(choice, dict)
        or choice.get("type") != "function"
        or not isinstance(name, str)
    ):
        raise BadRequestError(
            'tool_choice must be "none", "auto", "required" or {"type": "function", '
            f'"function": {{"name": ...}}}}, got {choice!r}',
            param="tool_choice",
        )
