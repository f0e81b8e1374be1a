"""Secrets: the oracle's shared token, and URIs stripped of credentials before they are shown or stored.

No TensorFlow, MLflow or gRPC import: the CLI, tracking and the distributed chief all use it.

- :func:`redact_uri` removes ``user:password@`` and the values of ``token=``, ``password=``,
  ``secret=`` (and similar) query parameters from a URI, so it can be printed, logged as a
  param or tag, written to an artifact or put in a child's argv.
- :func:`make_token` and :func:`read_token` give the chief and its workers the token every
  oracle RPC carries (``TOOLKIT_ORACLE_TOKEN``, or a file only its owner can read).
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import stat
from pathlib import Path

from toolkit.config import ConfigError

log = logging.getLogger(__name__)

ENV_TOKEN = "TOOLKIT_ORACLE_TOKEN"
REDACTED = "***"

# Query parameters whose values are credentials (matched case-insensitively, as substrings:
# access_token, api_key, client_secret, ...).
_SECRET_KEYS = ("token", "password", "passwd", "pwd", "secret", "key", "auth", "credential", "signature", "sig")
# user:password@ (or a bare user@, which may itself be a token) in a URI's authority.
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^/?#\s]*)@")
# One query parameter: ?name=value, &name=value or ;name=value.
_QUERY = re.compile(r"(?P<pre>[?&;](?P<name>[^=&#\s?;]+)=)(?P<value>[^&#\s;]*)")


def _secret_key(name: str) -> bool:
    lowered = name.lower()
    return any(key in lowered for key in _SECRET_KEYS)


def redact_uri(uri: str | None) -> str:
    """A URI without its credentials: ``user:password@`` and secret query values become ``***``.

    ``http://user:pw@host:5000/x?token=abc&a=1`` → ``http://***@host:5000/x?token=***&a=1``.
    It also works on text that quotes URIs (an error message, a log line): every
    ``scheme://user:pw@`` and every secret ``?name=value`` in it is redacted.

    Args:
        uri: A URI (or text that contains URIs). None and "" give "".

    Returns:
        The URI, safe to print, log or store.
    """
    if not uri:
        return ""
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{REDACTED}@", uri)
    return _QUERY.sub(lambda m: f"{m['pre']}{REDACTED}" if _secret_key(m["name"]) and m["value"] else m[0], text)


def has_credentials(uri: str | None) -> bool:
    """Whether :func:`redact_uri` would change ``uri``."""
    return bool(uri) and redact_uri(uri) != uri


def make_token() -> str:
    """A fresh token for one search: 32 random bytes, URL-safe (so it fits gRPC metadata)."""
    return secrets.token_urlsafe(32)


def read_token(path: str | Path | None = None, env: str = ENV_TOKEN) -> str | None:
    """The oracle's token, from a file (``--token-file``) or else the environment.

    Args:
        path: A file holding the token (surrounding whitespace ignored). It must be a regular
            file that only its owner can read or write (``chmod 600``), as ssh requires of keys.
            Defaults to None: read ``env``.
        env: The environment variable. Defaults to ``TOOLKIT_ORACLE_TOKEN``.

    Returns:
        The token, or None when neither gives one.

    Raises:
        ConfigError: When the file cannot be read, is empty, or others can read it.
    """
    if path is None:
        value = os.environ.get(env, "").strip()
        return value or None
    file = Path(path).expanduser()
    try:
        info = file.stat()
    except OSError as exc:
        raise ConfigError(f"--token-file {file} cannot be read: {exc.strerror}", field="--token-file") from None
    if not stat.S_ISREG(info.st_mode):
        raise ConfigError(f"--token-file must be a regular file. Received: {file}", field="--token-file")
    if info.st_mode & 0o077:
        raise ConfigError(
            f"--token-file {file} is readable by others (mode {stat.S_IMODE(info.st_mode):04o}): "
            f"run `chmod 600 {file}` so that only you can read the token",
            field="--token-file",
        )
    try:
        value = file.read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--token-file {file} cannot be read: {exc}", field="--token-file") from None
    if not value:
        raise ConfigError(f"--token-file {file} is empty", field="--token-file")
    if not value.isascii() or any(ch.isspace() for ch in value):
        raise ConfigError(f"the token in {file} must be one word of printable ASCII", field="--token-file")
    return value


def write_token(path: str | Path, token: str) -> Path:
    """Write ``token`` to a new file only its owner can read (0600). Returns the path."""
    file = Path(path)
    fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(token + "\n")
    return file
