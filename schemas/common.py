"""Shared building blocks of every message: the base model, names, bounded numbers.

Rules that hold for every model in `schemas/`:
- `schema_version` is present and equals `SCHEMA_VERSION`;
- unknown fields are rejected (`extra="forbid"`);
- NaN and +/-inf are rejected (`allow_inf_nan=False`);
- counts are non-negative, rho lies in [0, 1];
- names match `NAME_PATTERN`; free text is bounded by `MAX_TEXT_CHARS`.

Validation errors are pydantic `ValidationError`s; `describe_error` turns one into a short
line naming each offending field and value, for logs and dead-letter reasons.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

SCHEMA_VERSION: Literal[1] = 1

NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]*$"
MAX_NAME_CHARS = 64
MAX_ID_CHARS = 128
MAX_TEXT_CHARS = 4000
MAX_STAGES = 32

Name = Annotated[
    str, StringConstraints(pattern=NAME_PATTERN, min_length=1, max_length=MAX_NAME_CHARS)
]
"""A pipeline, stage or service name: lower-case, digits, `_` and `-`, first char alphanumeric."""

Identifier = Annotated[
    str,
    StringConstraints(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$", min_length=1, max_length=MAX_ID_CHARS
    ),
]
"""An opaque id (worker id, action id, episode id)."""

Text = Annotated[str, StringConstraints(max_length=MAX_TEXT_CHARS)]
Count = Annotated[int, Field(ge=0)]
NonNegFloat = Annotated[float, Field(ge=0.0)]
PosFloat = Annotated[float, Field(gt=0.0)]
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
Rho = Annotated[float, Field(ge=0.0, le=1.0)]
"""Share of one GPU that a GPU replica may use, 0..1."""
TimestampS = Annotated[float, Field(ge=0.0)]
"""Seconds since the Unix epoch (or since a simulation's start)."""

StageKind = Literal["cpu", "gpu"]


class SairModel(BaseModel):
    """Base of every message and spec: strict about shape, finite numbers, frozen."""

    model_config = ConfigDict(
        extra="forbid",
        allow_inf_nan=False,
        frozen=True,
        str_max_length=MAX_TEXT_CHARS,
        validate_default=True,
    )

    schema_version: Literal[1] = SCHEMA_VERSION


def describe_error(err: ValidationError, limit: int = 5) -> str:
    """One line naming each invalid field and the value it had, e.g.
    `stages.0.rho=1.5: Input should be less than or equal to 1`."""
    parts: list[str] = []
    for item in err.errors()[:limit]:
        loc = ".".join(str(p) for p in item["loc"]) or "<message>"
        value: Any = item.get("input")
        shown = repr(value)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        parts.append(f"{loc}={shown}: {item['msg']}")
    extra = err.error_count() - limit
    if extra > 0:
        parts.append(f"(+{extra} more)")
    return "; ".join(parts)


def check_unique(names: list[str], field: str) -> None:
    """Raise ValueError naming the first duplicated name."""
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise ValueError(f"{field}: duplicate stage name {name!r}")
        seen.add(name)
