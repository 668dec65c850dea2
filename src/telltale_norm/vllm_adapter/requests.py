"""vLLM request ids: the engine's internal ids back to the caller's ids."""

from __future__ import annotations

import re

# vLLM 0.32 makes internal ids "<external>-<8 hex>"; an n > 1 child is "<i>_<external>-<8 hex>".
_SUFFIX = re.compile(r"^(?P<base>.+)-[0-9a-f]{8}$")


def external_request_id(internal_id: str) -> tuple[str, int]:
    """`(caller's request id, candidate index)` of an engine-internal request id.

    An n = 1 request whose own id looks like "<digits>_<rest>" is read as a child; callers
    that hold the outputs match them exactly instead (see `rerank.select`).
    """
    match = _SUFFIX.match(internal_id)
    base = match.group("base") if match else internal_id
    head, sep, rest = base.partition("_")
    if sep and head.isdigit():
        return rest, int(head)
    return base, 0
