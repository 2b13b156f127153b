"""Schemathesis hooks for tests/e2e/test_api_fuzz.py (loaded through SCHEMATHESIS_HOOKS).

They bound how long one generated request may be held open, nothing else: `?wait=` is a
long poll the agent holds for up to 60 s by design, and `?follow=true` streams a log until
its deployment ends. Both are tested on their own elsewhere (test_polling_e2e, test_logs).
"""

from __future__ import annotations

from typing import Any

import schemathesis

MAX_WAIT_S = 0.2


@schemathesis.hook
def map_query(context: Any, query: dict[str, Any] | None) -> dict[str, Any] | None:
    if not query:
        return query
    wait = query.get("wait")
    if isinstance(wait, (int, float)) and not isinstance(wait, bool) and 0 < wait <= 60:
        query["wait"] = min(wait, MAX_WAIT_S)
    if query.get("follow") in (True, "true", "1", 1):
        query["follow"] = False
    return query
