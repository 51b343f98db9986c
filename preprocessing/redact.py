"""Hiding secrets in anything the project prints or logs: credentials in URIs and secret query values.

A tracking URI may carry ``user:password@``, a shard URL a signed query (``?token=...``, ``&sig=...``).
Every place that shows a configuration value or an error that may quote one passes it through
:func:`redact`. Standard library only: the tracking module (which depends on nothing of the project)
uses it too.
"""

from __future__ import annotations

import re

# user:password, the password written raw (people do: "@", "/", "?", "#", even a space): hidden up to the
# line's last "@". Over-hiding a line that also holds an e-mail address is the safe side of the trade.
# "host:port/" is not a user:password (a digit-only "password" followed by the path or the end).
_URI_USER_PASSWORD = re.compile(
    r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<cred>[^\s:/@?#]+:(?!\d+(?:[/?#\s]|$))[^\n]*)@")
# any other userinfo (a bare token): up to the last "@" before the path (a file URI's path may hold "@")
_URI_CREDENTIALS = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<cred>[^\s/]*)@")
# any query parameter whose name mentions a secret: access_token, api_key, X-Amz-Signature, X-Amz-Credential ...
_SECRET_QUERY = re.compile(
    r"(?i)([?&][^=&\s]*(?:password|passwd|token|secret|key|sig|signature|credential|auth)[^=&\s]*=)[^&\s]+")


def redact(text: str) -> str:
    """``https://user:pw@host/x?token=t`` -> ``https://***@host/x?token=***``; other text unchanged."""
    text = _URI_USER_PASSWORD.sub(lambda m: f"{m.group('scheme')}***@", text)
    text = _URI_CREDENTIALS.sub(lambda m: f"{m.group('scheme')}***@", text)
    return _SECRET_QUERY.sub(r"\1***", text)
