"""The one stored text of a CometBFT event attribute key or value, whatever the node version.

A 0.34 node sends keys and values base64-encoded (bytes), 0.37+ sends them as
text. Both become one canonical text (`canonical_bytes`), so a chain's rows do not depend on the
node version that served them:

- bytes that are valid UTF-8, contain no NUL (PostgreSQL's jsonb cannot hold U+0000) and do not
  start with the marker are stored as that text (a 0x01 byte is the text "\\u0001" from either node);
- anything else is stored as `b64:` followed by the standard base64 of the bytes. Text that starts
  with `b64:` is itself stored in the marked form, so a stored value starting with `b64:` always
  means bytes (`attribute_bytes` reverses it) and real text is never mistaken for it.

Text from a 0.37+ node is turned into bytes as UTF-8; a lone surrogate U+DC80..U+DCFF stands for
the raw byte 0x80..0xFF (the usual way undecodable bytes travel as text), so such a value comes out
exactly as the 0.34 node's base64 of the same bytes. (A stock Go 0.37+ node replaces undecodable
bytes by U+FFFD before it sends them; those bytes are lost at the node, not here.)

Which encoding a body uses is the node's version's (`attributes_base64_for`, from its /status:
0.34 and older base64, 0.35+ text); the client passes it. Without it (a WebSocket message, a
caller that does not know the node) it is detected per response: base64 when every attribute key
decodes as strict base64 into printable UTF-8 (`sender`, `amount`, ... are not valid base64). In
base64 mode a key or value that is not valid base64 is malformed.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterable
from typing import Any

MARKER = "b64:"
_MARKER_BYTES = MARKER.encode()
_VERSION = re.compile(r"v?([0-9]+)\.([0-9]+)")


def canonical_bytes(raw: bytes) -> str:
    """The one stored text of attribute bytes: the text where the bytes are UTF-8 without NUL and
    do not start with the marker, else `b64:` + standard base64 of the bytes."""
    if b"\x00" not in raw and not raw.startswith(_MARKER_BYTES):
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            pass
    return MARKER + base64.b64encode(raw).decode("ascii")


def canonical_text(text: str) -> str:
    """The stored text of a text attribute (0.37+): itself, unless `canonical_bytes` of its
    UTF-8 bytes says otherwise (NUL, the marker, lone surrogates)."""
    if "\x00" not in text and not text.startswith(MARKER):
        if text.isascii():
            return text
        try:
            text.encode("utf-8")
            return text
        except UnicodeEncodeError:
            pass
    try:
        raw = text.encode("utf-8", "surrogateescape")  # U+DC80..U+DCFF are the bytes 0x80..0xFF
    except UnicodeEncodeError:
        raw = text.encode("utf-8", "surrogatepass")  # other lone surrogates: kept, losslessly
    return canonical_bytes(raw)


def attribute_bytes(value: str) -> bytes:
    """The bytes a stored attribute text stands for (the inverse of `canonical_bytes`)."""
    if value.startswith(MARKER):
        return base64.b64decode(value[len(MARKER) :])
    return value.encode("utf-8")


def attributes_base64_for(node_version: str) -> bool | None:
    """Whether a node of this version (`node_info.version` of its /status) base64-encodes event
    attributes: Tendermint 0.34 and older do, 0.35+ and CometBFT 0.37+ do not. None when unknown."""
    match = _VERSION.match(node_version.strip()) if node_version else None
    if match is None:
        return None
    major, minor = int(match.group(1)), int(match.group(2))
    return major == 0 and minor <= 34


def _b64_key_text(value: str) -> bool:
    if not value or len(value) % 4:
        return False
    try:
        return base64.b64decode(value, validate=True).decode("utf-8").isprintable()
    except (binascii.Error, ValueError, UnicodeDecodeError):
        return False


def attributes_are_base64(event_lists: Iterable[Any]) -> bool:
    """Detection for a body whose node version is unknown: every non-empty string key is strict
    base64 of printable UTF-8 (and there is one). Stops at the first plain key."""
    seen = False
    for events in event_lists:
        if type(events) is not list:
            continue
        for event in events:
            attributes = event.get("attributes") if type(event) is dict else None
            if type(attributes) is not list:
                continue
            for attribute in attributes:
                key = attribute.get("key") if type(attribute) is dict else None
                if type(key) is str and key:
                    if not _b64_key_text(key):
                        return False
                    seen = True
    return seen
