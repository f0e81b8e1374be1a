"""Who may speak to the chief: the shared token on every RPC, optional TLS, and the metadata each call carries.

The chief's gRPC server checks the token with a server interceptor, before any oracle code
runs; a call without it (or with a wrong one) ends ``UNAUTHENTICATED``. Workers add it, with
their tuner id, to every call through a client interceptor on their channel, KerasTuner's own
oracle client included.
"""

from __future__ import annotations

import collections
import hmac
import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from toolkit.config import ConfigError
from toolkit.distributed.address import Address

META_TOKEN = "toolkit-oracle-token"
META_TUNER = "toolkit-tuner-id"
META_HEARTBEAT = "toolkit-heartbeat"
META_TRIAL_KEY = "toolkit-trial-key"  # handed out with each trial; its reports must carry it
META_HELLO = "toolkit-hello-bin"  # "-bin": gRPC metadata values must be ASCII unless binary

# gRPC backs off up to 2 minutes between attempts to connect; a worker waiting for a chief
# that is still starting should notice it within a second.
CHANNEL_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.min_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 1000),
)


@dataclass(frozen=True)
class ServerTLS:
    """The chief's certificate chain and private key (PEM files)."""

    cert: Path
    key: Path

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials([(_read(self.key, "--tls-key"), _read(self.cert, "--tls-cert"))])


@dataclass(frozen=True)
class ClientTLS:
    """The CA (PEM) a worker trusts for the chief's certificate."""

    ca: Path

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(root_certificates=_read(self.ca, "--tls-ca"))


def _read(path: Path, flag: str) -> bytes:
    try:
        return Path(path).expanduser().read_bytes()
    except OSError as exc:
        raise ConfigError(f"{flag} {path} cannot be read: {exc.strerror}", field=flag) from None


def server_tls(cert: str | None, key: str | None) -> ServerTLS | None:
    """``--tls-cert`` and ``--tls-key`` (both or neither) as a :class:`ServerTLS`."""
    if not cert and not key:
        return None
    if not (cert and key):
        raise ConfigError("--tls-cert and --tls-key go together: the chief needs its certificate and its key", field="--tls-cert")
    tls = ServerTLS(Path(cert), Path(key))
    tls.credentials()  # a missing or unreadable file is a usage error now, not a failure later
    return tls


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine only (``127.0.0.0/8``, ``::1``, ``localhost``)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# ---------------------------------------------------------------------------------------- server


class TokenCheck(grpc.ServerInterceptor):
    """Refuse every call that does not carry the shared token (``UNAUTHENTICATED``).

    Args:
        token: The shared secret.
    """

    def __init__(self, token: str) -> None:
        self._token = token.encode()
        self._deny = grpc.unary_unary_rpc_method_handler(_unauthenticated)

    def intercept_service(self, continuation: Any, handler_call_details: Any) -> Any:
        given = next((v for k, v in handler_call_details.invocation_metadata or () if k == META_TOKEN), "")
        given = given.encode() if isinstance(given, str) else bytes(given)
        if hmac.compare_digest(given, self._token):
            return continuation(handler_call_details)
        return self._deny


def _unauthenticated(request: Any, context: grpc.ServicerContext) -> Any:
    context.abort(
        grpc.StatusCode.UNAUTHENTICATED,
        "this oracle requires the search's token: set TOOLKIT_ORACLE_TOKEN or pass --token-file",
    )


# ---------------------------------------------------------------------------------------- client


class _CallDetails(
    collections.namedtuple("_CallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")),
    grpc.ClientCallDetails,
):
    pass


class _AddMetadata(grpc.UnaryUnaryClientInterceptor):
    """Adds fixed metadata (the token, the tuner id) to every unary call on a channel."""

    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self._metadata = metadata

    def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        metadata = (*(client_call_details.metadata or ()), *self._metadata)
        details = _CallDetails(
            client_call_details.method,
            client_call_details.timeout,
            metadata,
            client_call_details.credentials,
            client_call_details.wait_for_ready,
            client_call_details.compression,
        )
        return continuation(details, request)


def connect(oracle: Address, token: str | None = None, tuner_id: str | None = None, tls: ClientTLS | None = None) -> grpc.Channel:
    """A channel to the chief's oracle whose every call carries the token and the tuner id.

    Args:
        oracle: The chief's address.
        token: The shared token. Defaults to None (a chief started with ``--insecure``).
        tuner_id: This worker's id. Defaults to None.
        tls: The CA to verify the chief's certificate with. Defaults to None (plain TCP).

    Returns:
        The channel; close it when done.
    """
    if tls is None:
        channel = grpc.insecure_channel(oracle.target, options=list(CHANNEL_OPTIONS))
    else:
        channel = grpc.secure_channel(oracle.target, tls.credentials(), options=list(CHANNEL_OPTIONS))
    metadata = tuple((key, value) for key, value in ((META_TOKEN, token), (META_TUNER, tuner_id)) if value is not None)
    return grpc.intercept_channel(channel, _AddMetadata(metadata)) if metadata else channel
