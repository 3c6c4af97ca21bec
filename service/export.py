"""Writes the API's documents into api_schema/: `python -m service.export` (a test checks they are current).

- api_schema/openapi.json: the OpenAPI document of the job service;
- api_schema/job_spec.schema.json: the JSON Schema of the job spec (POST /v1/jobs bodies, `scdd distill --config`)."""

from __future__ import annotations

import json
from pathlib import Path

from api_schema import JobSpec
from service.api.main import create_app
from service.settings import Settings

FOLDER = Path(__file__).resolve().parent.parent / "api_schema"


def documents() -> dict[str, str]:
    app = create_app(Settings(api_keys=None, api_keys_file=None))
    return {
        "openapi.json": json.dumps(app.openapi(), indent=2, sort_keys=True) + "\n",
        "job_spec.schema.json": json.dumps(JobSpec.model_json_schema(by_alias=True), indent=2, sort_keys=True) + "\n",
    }


def main() -> None:
    for name, text in documents().items():
        (FOLDER / name).write_text(text)
        print(f"wrote {FOLDER / name}")


if __name__ == "__main__":
    main()
