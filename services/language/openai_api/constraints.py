"""Structured-output request fields (pydantic, at the HTTP edge) turned into one constraint.

OpenAI's `response_format` (`json_object`, `json_schema`), vLLM's `structured_outputs`
(`json`, `regex`, `choice`, `grammar`, `json_object`, `structural_tag`) and the older `guided_json`,
`guided_regex`, `guided_choice`, `guided_grammar` all become one xgrammar structural-tag format,
with the name of the field it came from for error messages. A request may set only one.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from services.language.engine.structured_output import Constraint
from services.language.errors import BadRequestError

# Any JSON object: what json_object asks for (strict schemas would close it to `{}`)
_ANY_OBJECT = {"type": "object", "additionalProperties": True}


class JSONSchemaParam(BaseModel):
    """OpenAI's `response_format.json_schema`."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | bool | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """OpenAI's `response_format` (plus vLLM's `structural_tag`)."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["text", "json_object", "json_schema", "structural_tag"]
    json_schema: JSONSchemaParam | None = None
    format: dict[str, Any] | None = None  # structural_tag: an xgrammar format


class StructuredOutputsParam(BaseModel):
    """vLLM's `structured_outputs`."""

    model_config = ConfigDict(extra="ignore")

    json_: dict[str, Any] | str | bool | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    structural_tag: str | dict[str, Any] | None = None
    whitespace_pattern: str | None = None
    # Accepted and without effect: JSON is always compact here, additionalProperties strict
    disable_any_whitespace: bool | None = None
    disable_additional_properties: bool | None = None
    disable_fallback: bool | None = None


def _schema(value: Any, param: str) -> Any:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise BadRequestError(f"{param} is not valid JSON: {exc}", param=param) from exc
    if not isinstance(value, (dict, bool)):
        raise BadRequestError(f"{param} must be a JSON schema object", param=param)
    return value


def _json(schema: Any, param: str) -> Constraint:
    return Constraint({"type": "json_schema", "json_schema": _schema(schema, param)}, param)


def _choice(choices: list[str], param: str) -> Constraint:
    if not choices:
        raise BadRequestError(f"{param} must list at least one choice", param=param)
    elements = [{"type": "const_string", "value": c} for c in choices]
    return Constraint({"type": "or", "elements": elements}, param)


def _text(kind: str, text: str, param: str) -> Constraint:
    if not text:
        raise BadRequestError(f"{param} must not be empty", param=param)
    key = "pattern" if kind == "regex" else "grammar"
    return Constraint({"type": kind, key: text}, param)


def _tag(value: Any, param: str) -> Constraint:
    value = _schema(value, param)
    fmt = value.get("format") if isinstance(value, dict) else None
    if not isinstance(fmt, dict):
        raise BadRequestError(
            f'{param} must be {{"type": "structural_tag", "format": {{...}}}} (xgrammar\'s form)',
            param=param,
        )
    return Constraint(fmt, param)


def _from_response_format(value: ResponseFormat) -> Constraint | None:
    if value.type == "text":
        return None
    if value.type == "json_object":
        return Constraint({"type": "json_schema", "json_schema": _ANY_OBJECT}, "response_format")
    if value.type == "structural_tag":
        return _tag(value.model_dump(), "response_format")
    param = "response_format.json_schema.schema"
    if value.json_schema is None or value.json_schema.schema_ is None:
        raise BadRequestError(f"{param} is required for a json_schema response_format", param=param)
    return _json(value.json_schema.schema_, param)


def _from_structured(value: StructuredOutputsParam) -> list[Constraint]:
    if value.whitespace_pattern is not None:
        raise BadRequestError(
            "structured_outputs.whitespace_pattern is not supported (JSON is generated compact)",
            param="structured_outputs.whitespace_pattern",
        )
    found = []
    prefix = "structured_outputs."
    if value.json_ is not None:
        found.append(_json(value.json_, prefix + "json"))
    if value.regex is not None:
        found.append(_text("regex", value.regex, prefix + "regex"))
    if value.choice is not None:
        found.append(_choice(value.choice, prefix + "choice"))
    if value.grammar is not None:
        found.append(_text("grammar", value.grammar, prefix + "grammar"))
    if value.json_object:
        found.append(
            Constraint({"type": "json_schema", "json_schema": _ANY_OBJECT}, prefix + "json_object")
        )
    if value.structural_tag is not None:
        found.append(_tag(value.structural_tag, prefix + "structural_tag"))
    return found


def request_constraint(
    response_format: ResponseFormat | None,
    structured_outputs: StructuredOutputsParam | None,
    guided: dict[str, Any],
) -> Constraint | None:
    """The request's one output constraint, or None; 400 when it sets several."""
    found: list[Constraint] = []
    if response_format is not None:
        constraint = _from_response_format(response_format)
        if constraint is not None:
            found.append(constraint)
    if structured_outputs is not None:
        found.extend(_from_structured(structured_outputs))
    builders = {
        "guided_json": lambda v, p: _json(v, p),
        "guided_regex": lambda v, p: _text("regex", v, p),
        "guided_choice": _choice,
        "guided_grammar": lambda v, p: _text("grammar", v, p),
    }
    for name, build in builders.items():
        if guided.get(name) is not None:
            found.append(build(guided[name], name))
    if len(found) > 1:
        names = ", ".join(c.param for c in found)
        raise BadRequestError(
            f"give at most one output constraint; this request sets {names}", param=found[1].param
        )
    return found[0] if found else None
