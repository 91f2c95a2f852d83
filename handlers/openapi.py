"""GET /openapi.json: the repository's openapi.yaml, parsed once at start and served as JSON.

The document is read when the route table is built (``openapi_route``), not
per request, so serving it never touches the disk; a missing or broken file
stops the start instead of surfacing as a 500 later.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import yaml

from handlers.base import BaseHandler
from handlers.services import Services

OPENAPI_PATH = Path(__file__).resolve().parent.parent / "openapi.yaml"


def load_openapi(path: Path = OPENAPI_PATH) -> bytes:
    """The YAML description as compact JSON bytes (anchors and merge keys resolved)."""
    with path.open("rb") as fh:
        document = yaml.safe_load(fh)
    if not isinstance(document, dict) or "openapi" not in document or "paths" not in document:
        raise ValueError(f"{path}: not an OpenAPI document")
    # Templates exist only to be inlined by YAML anchors; they are not part of the API.
    document.pop("x-templates", None)
    return orjson.dumps(document)


class OpenAPIHandler(BaseHandler):
    route_class = "diagnostics"
    operation = "openapi"

    def initialize(self, services: Services, document: bytes, **kwargs: Any) -> None:  # type: ignore[override]
        super().initialize(services, **kwargs)
        self.document = document

    def get(self) -> None:
        self.set_header("Content-Type", "application/json")
        self.finish(self.document)

    head = get
