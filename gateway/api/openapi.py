"""The OpenAPI document of the REST API and live feeds (placeholder: filled in by issue 5 work)."""

from __future__ import annotations

from typing import Any


def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3 document served at ``/v1/openapi.json``."""
    return {"openapi": "3.0.3", "info": {"title": "Callgate", "version": "0.1.0"}, "paths": {}}
