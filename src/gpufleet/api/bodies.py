"""Reading a request body: never more than a limit, never for longer than a timeout.

A client that announces or sends too much gets 413 as soon as that is known; one that stalls gets 408 after
``api.body_timeout_s``, so a slow upload cannot hold a connection slot (``api.max_connections``) for ever.
"""

from __future__ import annotations

import asyncio

from starlette.requests import Request

from gpufleet.errors import BodyTimeoutError, PayloadTooLargeError


async def read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The raw body.

    Raises:
        PayloadTooLargeError: Content-Length, or the bytes received so far, exceed ``limit``.
        BodyTimeoutError: the whole body did not arrive within ``timeout_s``.
    """
    too_large = PayloadTooLargeError("payload_too_large", f"the body exceeds {limit} bytes")
    length = request.headers.get("content-length", "")
    if length.isascii() and length.isdigit() and int(length) > limit:
        raise too_large
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise too_large
                chunks.append(chunk)
    except TimeoutError:
        raise BodyTimeoutError("body_timeout", f"the body did not arrive within {timeout_s:g} s") from None
    return b"".join(chunks)
