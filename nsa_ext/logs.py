"""Structured log records under `logging.getLogger("nsa_ext")`.

An event is one record whose message starts with its name (`sel.dispatch`, `sel.sdpa.buckets`,
`sel.triton.reads`, ...) and which carries its fields as attributes `nsa_event` (the name) and
`nsa_fields` (a dict), so a test or a log handler can read them without parsing text.
Events are emitted only when `Settings.debug` is on (NSA_DEBUG_LOG=1 or NSA_DEBUG_TRITON=1).
"""
from __future__ import annotations

import logging

logger = logging.getLogger("nsa_ext")


def log_event(name: str, **fields) -> None:
    text = " ".join(f"{key}={value}" for key, value in fields.items())
    logger.info("%s %s", name, text, extra={"nsa_event": name, "nsa_fields": fields})
