"""Valid JSON, checked as a browser's ``JSON.parse`` checks it: Python's ``json.loads`` alone takes
the bare ``NaN``, ``Infinity`` and ``-Infinity`` tokens that JavaScript refuses."""

from __future__ import annotations

import json
from typing import Any

NON_FINITE = ("NaN", "Infinity", "-Infinity")
"""How the protocol and every server answer spell a non-finite figure: as these JSON strings."""


def strict_json(text: str | bytes) -> Any:
    """``json.loads(text)``; AssertionError when the text holds a bare NaN or infinity token."""

    def refuse(constant: str) -> Any:
        raise AssertionError(f"bare {constant} token, which JSON.parse refuses, in {str(text)[:300]!r}")

    return json.loads(text, parse_constant=refuse)
