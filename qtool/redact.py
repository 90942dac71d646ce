"""Credentials out of everything qtool prints: URLs (``HF_ENDPOINT=http://user:TOKEN@host``,
``?token=...``) and the Hub token itself, wherever an exception's text carries them.

Imports nothing of qtool: any module (and the CLI's error line) may use it.
"""
from __future__ import annotations

import os
import re
from urllib.parse import urlsplit, urlunsplit

REDACTED = "***"
# scheme://rest, up to whitespace or a quote: the URLs inside an exception's text.
_URL_RE = re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>`]+")
# Query or fragment parameters whose value is a credential: token=, access_token=, api_key=, sig=, ...
_SECRET_PARAM_RE = re.compile(r"(?i)((?:^|[?&;#])[^=&;#]*(?:token|key|secret|passw|pwd|sig|auth|credential|session)"
                              r"[^=&;#]*=)[^&;#]*")
# Environment variables whose values are secrets that must never be echoed.
_SECRET_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_TOKEN")


def redact_url(url: str) -> str:
    """``url`` without its userinfo (``user:password@``) and with credential parameters' values as ***."""
    try:
        parts = urlsplit(url)
    except ValueError:   # e.g. a malformed IPv6 host: hide everything between "//" and the host's end
        return re.sub(r"//[^/?#]*@", f"//{REDACTED}@", _SECRET_PARAM_RE.sub(rf"\1{REDACTED}", url))
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{REDACTED}@{netloc.rpartition('@')[2]}"
    query = _SECRET_PARAM_RE.sub(rf"\1{REDACTED}", parts.query)
    fragment = _SECRET_PARAM_RE.sub(rf"\1{REDACTED}", parts.fragment)
    return urlunsplit((parts.scheme, netloc, parts.path, query, fragment))


def redact_text(text: str) -> str:
    """Free text (an error message, an exception's ``str``) with every URL in it redacted and the
    values of secret environment variables (HF_TOKEN) replaced by ***."""
    text = _URL_RE.sub(lambda found: redact_url(found.group(0)), text)
    for name in _SECRET_ENV:
        secret = os.environ.get(name, "").strip()
        if len(secret) >= 8:   # a short value would blank out ordinary words
            text = text.replace(secret, REDACTED)
    return text
