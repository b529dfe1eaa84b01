"""Reading a node's HTTP answer: the JSON body, the error text inside it, the Retry-After header."""

from __future__ import annotations

import json
from typing import Any

import orjson


def retry_after(value: str | None) -> float:
    try:
        return max(0.0, float(value)) if value else 1.0
    except ValueError:
        return 1.0


def json_body(content: bytes) -> Any:
    """The body as JSON, None when it is not JSON. orjson (~2x the standard library on these bodies)
    refuses lone surrogates (`\\udcff`), which a 0.37+ node may send for undecodable attribute bytes
    (`indexer.rpc.attributes`); only such a body is read again by the standard library."""
    try:
        return orjson.loads(content)
    except orjson.JSONDecodeError:
        pass
    try:
        return json.loads(content)
    except (ValueError, RecursionError):  # not JSON, or nested past the parser's depth
        return None


def error_text(body: Any) -> str:
    if isinstance(body, dict) and body.get("error"):
        error = body["error"]
        if isinstance(error, dict):
            return " ".join(str(error.get(k, "")) for k in ("message", "data")).strip()
        return str(error)
    return ""
