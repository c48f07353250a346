"""The app's answer to a request that fails validation: a 422 that always encodes.

FastAPI's own handler puts each error's ``input`` (and ``ctx``) into the body as they are, and its
JSON encoder refuses non-finite floats: ``{"target_divergence": NaN}`` (or ``Infinity``, or
``1e999``, which Python reads as inf) became a 500 while building the 422 that explains it. Here
the errors are encoded with every non-finite float written as the string JSON lacks a literal for
(``"NaN"``, ``"Infinity"``, ``"-Infinity"``), and anything else that is not JSON as its ``repr``.
"""

from __future__ import annotations

import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

_NON_FINITE = {math.inf: "Infinity", -math.inf: "-Infinity"}


def json_safe(value: Any) -> Any:
    """``value`` with what strict JSON cannot hold replaced by strings (non-finite floats, odd types)."""
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        return _NON_FINITE.get(value, value)
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [json_safe(v) for v in value]
    if isinstance(value, BaseException):  # a validator's error in ``ctx``
        return str(value)
    try:
        return json_safe(jsonable_encoder(value))
    except Exception:  # an input the encoder does not know: say what it was
        return repr(value)


async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """422 with FastAPI's body (``{"detail": [errors]}``), encodable whatever the input held."""
    return JSONResponse(status_code=422, content={"detail": json_safe(exc.errors())})


def install(app: FastAPI) -> None:
    """Answer every request validation error of ``app`` with ``validation_error``."""
    app.add_exception_handler(RequestValidationError, validation_error)
