"""Export the JSON Schemas of every message to `schemas/json/` (checked in).

Run `python -m schemas.export` after changing a model; a test fails while the files are stale.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .messages import ALL_MESSAGES

JSON_DIR = Path(__file__).parent / "json"


def render_all() -> dict[str, str]:
    """File name -> JSON text of each message's schema (validation mode)."""
    out: dict[str, str] = {}
    for model in ALL_MESSAGES:
        schema = model.model_json_schema(mode="validation")
        schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
        schema["$id"] = f"https://sair.dev/schemas/v1/{model.__name__}.json"
        out[f"{model.__name__}.json"] = json.dumps(schema, indent=2, sort_keys=True) + "\n"
    return out


def write_all(directory: Path = JSON_DIR) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    rendered = render_all()
    for stale in directory.glob("*.json"):
        if stale.name not in rendered:
            stale.unlink()
    for name, text in rendered.items():
        path = directory / name
        path.write_text(text)
        written.append(path)
    return written


def main() -> int:
    for path in write_all():
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
