"""The pieces both schemas (requests and config) are declared with, and the one reading of pydantic's errors.

A schema here is a frozen stdlib dataclass whose annotations carry the rules; pydantic
validates input into it (`TypeAdapter`), so code that builds or `dataclasses.replace`s
one directly is not validated again. Rules that relate several fields raise `refuse`,
which may name several fields at once, relative to the object that raised it.
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Mapping, NoReturn

from pydantic import ValidationError
from pydantic_core import PydanticCustomError, core_schema

Location = tuple[str | int, ...]
Problem = tuple[Location, str]

_SIZE_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}

# The error type `refuse` raises: its context holds the problems it names.
REFUSED = "refused"
# The error type pydantic gives a member a dataclass has no field for.
UNKNOWN = "unexpected_keyword_argument"


def refuse(*problems: tuple[str | Location, str]) -> NoReturn:
    """Fails validation of the current object with these (field, message) problems; "" is the object itself."""
    named = tuple((_location(field), message) for field, message in problems)
    summary = "; ".join(message for _, message in named)
    raise PydanticCustomError(REFUSED, "{summary}", {"summary": summary, "problems": named})


def invalid(message: str) -> NoReturn:
    """Fails validation of the value at hand with this message."""
    refuse(("", message))


def _location(field: str | Location) -> Location:
    if isinstance(field, tuple):
        return field
    return (field,) if field else ()


class Between:
    """An annotation: the number lies in [minimum, maximum], said as "must be between ..." and in the JSON Schema."""

    def __init__(self, minimum: float, maximum: float, *, unit: str = "") -> None:
        self.minimum, self.maximum, self.unit = minimum, maximum, unit

    def __get_pydantic_core_schema__(self, source: Any, handler: Any) -> core_schema.CoreSchema:
        return core_schema.no_info_after_validator_function(self.check, handler(source))

    def __get_pydantic_json_schema__(self, schema: core_schema.CoreSchema, handler: Any) -> dict[str, Any]:
        return {**handler(schema), "minimum": self.minimum, "maximum": self.maximum}

    def check(self, value: float) -> float:
        if not self.minimum <= value <= self.maximum:
            shown = "{}" if isinstance(self.minimum, int) and isinstance(self.maximum, int) else "{:g}"
            low, high = shown.format(self.minimum), shown.format(self.maximum)
            invalid(f"must be between {low} and {high}{self.unit}")
        return value


def parse_size(value: Any) -> int:
    """Parses a byte size: an integer, or a string such as "512m" or "2GiB"; raises ValueError."""
    if isinstance(value, bool):
        raise ValueError("must be a size such as 512m or 2g")
    if isinstance(value, int):
        if value <= 0:
            raise ValueError("must be positive")
        return value
    match = _SIZE_PATTERN.match(str(value)) if isinstance(value, str) else None
    if not match:
        raise ValueError("must be a size such as 512m or 2g")
    size = int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])
    if size <= 0:
        raise ValueError("must be positive")
    return size


def present_members(data: Any) -> Any:
    """An object without its null members: in a request, null means absent."""
    if isinstance(data, dict):
        return {key: value for key, value in data.items() if value is not None}
    return data


def problems_of(error: ValidationError, messages: Mapping[str, str]) -> list[Problem]:
    """Every problem pydantic found, as (location, message), worded by `messages` (error type -> template).

    A template may use the error's context (`{max_length}`, `{expected}`, ...) and `{type}`,
    the kind of value that was given ("a string", "an integer", ...). A dictionary key's own
    problem is located at the key.
    """
    problems: list[Problem] = []
    for item in error.errors(include_url=False):
        location = tuple(part for part in item["loc"] if part != "[key]")
        context = item.get("ctx") or {}
        if item["type"] == REFUSED:
            problems.extend((location + relative, message) for relative, message in context["problems"])
            continue
        template = messages.get(item["type"])
        if template is None:  # a pydantic check the schema did not reword: its own message, as a clause
            message = item["msg"][:1].lower() + item["msg"][1:]
        else:
            message = template.format(**context, type=kind_of(item.get("input")))
        problems.append((location, message))
    return problems


def kind_of(value: Any) -> str:
    """What a value is, in the words of TOML and JSON users."""
    kinds = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list", dict: "a table"}
    return kinds.get(type(value), type(value).__name__)


def dotted(location: Iterable[str | int]) -> str:
    """A location as problems name it: `build.env.FOO`, `auth.tokens[0].name`; a NUL is spelled out."""
    text = ""
    for part in location:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            shown = part.replace("\x00", "\\u0000")
            text = f"{text}.{shown}" if text else shown
    return text
