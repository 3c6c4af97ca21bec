"""Credentials out of what the service logs and prints: `redact_url` for one URL, `redact_text` for free text.

A Redis URL carries its password (`redis://:secret@host:6379/0`, `rediss://user:secret@host`, or
`?password=secret`), an object-store URL may carry keys or a signature (`s3://key:secret@bucket/...`, presigned
`X-Amz-Signature=...`). Logs (the Ray job log, `scdd serve`'s, the GC's) are read by more people than the secret
is meant for, so every URL there goes through these first: the user and password become `***`, and so do the
values of query parameters that carry secrets; the scheme, host, port and path stay, so the line still says
which server it means.
"""

from __future__ import annotations

import re

__all__ = ["redact_url", "redact_text"]

MASK = "***"
# Query parameters whose values are secrets (Redis URLs: password; presigned and token-carrying URLs: the rest).
SECRET_PARAMS = re.compile(
    r"(?i)([?&;](?:password|passwd|pass|pwd|secret|secret_key|access_key|token|auth|api_key|key|sig|signature|"
    r"credential|x-amz-signature|x-amz-credential|x-amz-security-token|x-goog-signature|x-goog-credential)=)"
    r"[^&;#\s'\"]*")
URL = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"<>`]+")
HOST = re.compile(r"^(?:\[[0-9A-Fa-f:.]+\]|[^\s/?#@:\[\]]*)(?::\d*)?(?=[/?#]|$)")


def redact_url(url: str) -> str:
    """`url` with its user and password (if any) replaced by `***` and secret query values by `***`; the scheme,
    host, port and path kept. Text that is no URL comes back unchanged."""
    scheme, sep, rest = url.partition("://")
    if not sep or not re.fullmatch(r"[A-Za-z][A-Za-z0-9+.\-]*", scheme):
        return url
    authority_end = len(rest)
    for mark in "/?#":
        found = rest.find(mark)
        if found != -1:
            authority_end = min(authority_end, found)
    at = rest.rfind("@", 0, authority_end)
    if at == -1 and "@" in rest[authority_end:]:
        # a password with '/', '?' or '#' in it (unescaped) ends the authority early: the userinfo runs to the last
        # '@' that a host follows, as long as what came before it cannot be a host itself
        head = rest[:authority_end]
        if not HOST.match(head):
            for candidate in reversed([i for i, char in enumerate(rest) if char == "@"]):
                if HOST.match(rest[candidate + 1:]):
                    at = candidate
                    break
    if at != -1:
        rest = MASK + rest[at:]
    return f"{scheme}://{SECRET_PARAMS.sub(lambda m: m.group(1) + MASK, rest)}"


def redact_text(text: str) -> str:
    """`text` with every URL in it redacted (`redact_url`): for messages and exceptions that may quote a URL."""
    return URL.sub(lambda match: redact_url(match.group(0)), str(text))
