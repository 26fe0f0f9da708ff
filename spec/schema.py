"""The JSON Schema of scene files, generated from the pydantic models (checked in under schemas/)."""

from __future__ import annotations

import json

SCHEMA_ID = "https://scenec.dev/schemas/scene.schema.json"


def scene_schema() -> dict:
    from .models import Scene

    schema = Scene.model_json_schema()
    # a library file (`scenec` and `defs`, no `canvas`) carries the same modeline (scenes/lib/): it is valid too,
    # as `scenec validate` takes it; a file with neither `canvas` nor `defs` is still told it needs `canvas`
    schema["required"] = [k for k in schema.get("required", []) if k != "canvas"]
    schema["anyOf"] = [{"required": ["canvas"]}, {"required": ["defs"]}]
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": SCHEMA_ID, **schema}


def scene_schema_text() -> str:
    return json.dumps(scene_schema(), indent=2, ensure_ascii=False) + "\n"
