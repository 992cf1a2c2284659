"""Reading a posted form: URL-encoded only, bounded in size, decoded strictly.

Why by hand: the inbox's forms are small URL-encoded bodies; parsing them here keeps
`python-multipart` (and file uploads) out of the app, and a body over the limit is refused
before it is read whole.
"""

from __future__ import annotations

from urllib.parse import parse_qsl

from starlette.requests import Request

FORM_TYPE = "application/x-www-form-urlencoded"
MAX_FIELDS = 50


class FormRefused(ValueError):
    """The body is not a form the inbox accepts; `status` is the HTTP status to answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


async def read_form(request: Request, *, max_bytes: int) -> dict[str, str]:
    """The form's fields (the last value of a repeated name wins), or FormRefused."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != FORM_TYPE:
        raise FormRefused(415, f"expected a form ({FORM_TYPE})")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise FormRefused(413, f"the form is larger than {max_bytes} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise FormRefused(413, f"the form is larger than {max_bytes} bytes")
    try:
        text = body.decode("utf-8")
        pairs = parse_qsl(
            text, keep_blank_values=True, strict_parsing=False, max_num_fields=MAX_FIELDS
        )
    except (UnicodeDecodeError, ValueError) as exc:
        raise FormRefused(400, f"the form could not be read: {exc}") from None
    return dict(pairs)
