"""Cleaning a document: LF line ends, no control characters, one Unicode normal form.

Most text needs none of it, so each step first checks, at memchr-like speed on the UTF-8 bytes,
whether it has anything to do; clean text passes through without a copy.
"""

from __future__ import annotations

import re
import unicodedata

from lmforge.errors import LmforgeError

# C0/C1 control characters except tab and newline (\r is turned into \n before this applies).
# The prepared files' document separator \x1e is among them, so it never occurs inside a document.
CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")
# The same set as UTF-8 bytes: C0 controls and DEL are single bytes (never part of a multi-byte
# character); C1 controls are \xc2\x80-\xc2\x9f, so a text without a \xc2 byte has none.
_C0_BYTES = bytes(b for b in range(32) if b not in (0x09, 0x0A, 0x0D)) + b"\x7f"
NORMAL_FORMS = ("NFC", "NFKC", "NFD", "NFKD")


def check_normal_form(form: str | None) -> str | None:
    """``data.normalize`` validated: a Unicode normal form, or None to keep text as it is."""
    if form in (None, "", "none", "None", False):
        return None
    if form not in NORMAL_FORMS:
        raise LmforgeError(f"data.normalize='{form}' is not one of {', '.join(NORMAL_FORMS)} or null.")
    return form


def clean(text: str, data: bytes | None, form: str | None) -> tuple[str, bytes, int]:
    """Clean one piece of text; return ``(text, its UTF-8 bytes, UTF-8 bytes of the input)``.

    ``data`` is the UTF-8 encoding of ``text`` when the caller has it (else None). CRLF and CR
    become LF, control characters other than tab and newline are removed, and ``form`` (e.g.
    ``NFC``, or None) normalises the text. Any piece cut after a line end cleans the same alone
    as inside its document: none of these steps looks across a newline.
    """
    if data is None:
        data = text.encode("utf-8")
    size_in = len(data)
    changed = False
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
        changed = True
    if len(data.translate(None, _C0_BYTES)) != size_in or (b"\xc2" in data and CONTROL.search(text)):
        text = CONTROL.sub("", text)
        changed = True
    if form is not None and not text.isascii():
        normal = unicodedata.normalize(form, text)
        if normal != text:
            text, changed = normal, True
    return text, (text.encode("utf-8") if changed else data), size_in
