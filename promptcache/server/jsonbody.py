"""Request bodies from the wire: JSON parsed within limits, pydantic errors as 400s naming the field.

`parse_json` refuses what the standard parser would turn into a 500 (a RecursionError on deep
nesting, a ValueError on integers of more than 4,300 digits, even in fields nobody reads) and what
no API here needs (NaN and Infinity), each as a 400 naming the problem. `validation_error` turns
pydantic's errors into one `ApiError` whose `param` is the first bad field's path
(`messages[0].content`) and whose message says what would be valid.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from fastapi import Request
from fastapi.routing import APIRoute
from starlette.responses import Response

from .errors import ApiError, bad_field

MAX_DEPTH = 64  # nested arrays/objects; the APIs here need at most ~6
MAX_INT_DIGITS = 4300  # Python's int(str) limit: more raise ValueError deep in the parser


def parse_json(raw: bytes) -> Any:
    """The decoded JSON body; an ApiError (400, param "body") naming what is wrong with it."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(400, f"the body is not UTF-8 (byte {e.start})", param="body") from None
    try:
        value = json.loads(text, parse_int=_integer, parse_constant=_constant)
    except RecursionError:
        raise _too_deep() from None
    except json.JSONDecodeError as e:
        raise ApiError(400, f"the body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}",
                       param="body", code="invalid_json") from None
    if _depth_over(value, MAX_DEPTH):
        raise _too_deep()
    return value


def _integer(digits: str) -> int:
    if len(digits.lstrip("-")) > MAX_INT_DIGITS:
        raise ApiError(400, f"the body holds an integer of {len(digits.lstrip('-'))} digits; at most "
                       f"{MAX_INT_DIGITS} are accepted", param="body", code="invalid_json")
    return int(digits)


def _constant(name: str) -> float:
    raise ApiError(400, f"the body holds {name}, which is not JSON (numbers must be finite)", param="body",
                   code="invalid_json")


def _too_deep() -> ApiError:
    return ApiError(400, f"the body is nested more than {MAX_DEPTH} arrays/objects deep", param="body",
                    code="invalid_json")


def _depth_over(value: Any, limit: int) -> bool:
    """True when `value` nests deeper than `limit` (iterative: no recursion on hostile input)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (list, dict)):
            if depth > limit:
                return True
            stack.extend((v, depth + 1) for v in (item.values() if isinstance(item, dict) else item))
    return False


# ---- pydantic errors ------------------------------------------------------------------------

_PHRASES = {
    "missing": "is required",
    "string_type": "must be a string",
    "int_type": "must be an integer",
    "int_from_float": "must be an integer",
    "float_type": "must be a finite number",
    "finite_number": "must be a finite number",
    "bool_type": "must be true or false",
    "list_type": "must be an array",
    "dict_type": "must be an object",
    "model_type": "must be an object",
    "model_attributes_type": "must be an object",
    "extra_forbidden": "is not a field of this request",
    "literal_error": "must be one of {expected}",
    "enum": "must be one of {expected}",
    "greater_than": "must be > {gt}",
    "greater_than_equal": "must be >= {ge}",
    "less_than": "must be < {lt}",
    "less_than_equal": "must be <= {le}",
    "too_short": "must have at least {min_length} item(s)",
    "too_long": "must have at most {max_length} item(s)",
    "string_too_short": "must have at least {min_length} character(s)",
    "string_too_long": "must have at most {max_length} characters",
}


def validation_error(errors: Sequence[dict], prefix: Sequence[str | int] = ("body",)) -> ApiError:
    """The first of pydantic's `errors` as a 400 naming the field and what would be valid."""
    error = _most_telling(errors)
    loc = list(error.get("loc", ()))
    if loc[: len(prefix)] == list(prefix):
        loc = loc[len(prefix):]
    param = field_path(loc) or "body"
    phrase = _PHRASES.get(error.get("type", ""))
    if error.get("input", 0) is None and error.get("type", "").endswith("_type"):
        phrase = "is required"
    if phrase is None:
        message = str(error.get("msg", "is not valid"))
    else:
        try:
            message = phrase.format(**(error.get("ctx") or {}))
        except (KeyError, IndexError):
            message = phrase
    if phrase != "is required":
        message += f", got {_shown(error.get('input'))}"
    return bad_field(param, message)


def _most_telling(errors: Sequence[dict]) -> dict:
    """The first field's error; of a union's (one per member), one that is not about the value's type
    (`stop: [""]` is a list with an empty string, not "not a string")."""
    path = field_path(errors[0].get("loc", ()))
    same = [e for e in errors if field_path(e.get("loc", ())) .startswith(path)]
    return next((e for e in same if not str(e.get("type", "")).endswith("_type")), errors[0])


_UNION_TAGS = {"str", "int", "float", "bool", "list", "dict", "constrained-str", "constrained-int",
               "constrained-float", "none"}


def field_path(loc: Sequence[str | int]) -> str:
    """`("messages", 0, "content")` -> `messages[0].content` (pydantic's union tags left out)."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif "[" in str(part) or str(part) in _UNION_TAGS or str(part).startswith(("function-", "tagged-union")):
            continue  # a union member's name, not a field
        else:
            out += f".{part}" if out else str(part)
    return out


def _shown(value: Any) -> str:
    for kind, name in ((bool, "a boolean"), (str, "a string"), (int, "an integer"), (float, "a number"),
                       (list, "an array"), (dict, "an object")):
        if isinstance(value, kind):
            if kind in (bool, int, float):
                return f"{value!r:.40}"
            return f"{name} {value!r:.60}" if kind is str else name
    return "null" if value is None else type(value).__name__


# ---- routes ----------------------------------------------------------------------------------


class SafeJSONRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = parse_json(await self.body())
        return self._json


class SafeRoute(APIRoute):
    """FastAPI's route, parsing JSON bodies with `parse_json`, whatever Content-Type the client sent
    (curl's `-d` says form data; the server this replaces read every body as JSON)."""

    def get_route_handler(self):
        handler = super().get_route_handler()
        json_body = self.body_field is not None

        async def safe_handler(request: Request) -> Response:
            scope = request.scope
            if json_body:
                headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
                scope = {**scope, "headers": [*headers, (b"content-type", b"application/json")]}
            return await handler(SafeJSONRequest(scope, request.receive))

        return safe_handler
