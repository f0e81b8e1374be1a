"""Where the chief is and who a worker is: ``HOST:PORT`` addresses, KerasTuner's environment variables, worker ids."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

from toolkit.config import ConfigError

ENV_TUNER_ID = "KERASTUNER_TUNER_ID"
ENV_ORACLE_IP = "KERASTUNER_ORACLE_IP"
ENV_ORACLE_PORT = "KERASTUNER_ORACLE_PORT"
ENV_ORACLE_TIMEOUT = "TOOLKIT_ORACLE_TIMEOUT"
ENV_WORKER_LEASE = "TOOLKIT_WORKER_LEASE"

# Long enough for a chief on another host to load its data and start serving, short enough that
# a typo in --oracle is reported within a minute.
DEFAULT_ORACLE_TIMEOUT = 60.0
# Six missed heartbeats: a worker busy in a long TensorFlow op still gets the GIL far more often.
DEFAULT_WORKER_LEASE = 30.0
HEARTBEAT_EVERY = 5.0


class ChiefUnreachable(RuntimeError):
    """A worker could not reach the chief's oracle, or lost it during the search."""


@dataclass(frozen=True)
class Address:
    """A ``HOST:PORT`` for the oracle's gRPC server."""

    host: str
    port: int

    @classmethod
    def parse(cls, text: str, flag: str) -> Address:
        """Parse ``HOST:PORT`` (``[::1]:8000`` for IPv6).

        Args:
            text: The address.
            flag: The option it came from, named in the error.

        Raises:
            ConfigError: When it is not ``HOST:PORT`` with a port in 0-65535.
        """
        host, sep, port = text.strip().rpartition(":")
        host = host.strip("[]")
        if not sep or not host or not port.isdigit() or int(port) > 65535:
            raise ConfigError(f"{flag} must be HOST:PORT, e.g. 10.0.0.5:8000. Received: {text!r}", field=flag)
        return cls(host, int(port))

    @property
    def target(self) -> str:
        """The address as gRPC spells it."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def __str__(self) -> str:
        return self.target


def _env_role() -> str | None:
    """The role KerasTuner's environment variables give, as ``keras_tuner.src.distribute.utils`` reads them."""
    if not os.environ.get(ENV_ORACLE_IP):
        return None
    for name in (ENV_ORACLE_PORT, ENV_TUNER_ID):
        if not os.environ.get(name):
            raise ConfigError(
                f"{ENV_ORACLE_IP} is set but {name} is not: set {ENV_TUNER_ID}, {ENV_ORACLE_IP} and {ENV_ORACLE_PORT} together",
                field=name,
            )
    return "chief" if "chief" in os.environ[ENV_TUNER_ID] else "worker"


def _env_address(flag: str) -> Address:
    ip, port = os.environ.get(ENV_ORACLE_IP), os.environ.get(ENV_ORACLE_PORT)
    if not ip or not port:
        raise ConfigError(f"{flag} HOST:PORT is required (or set {ENV_ORACLE_IP} and {ENV_ORACLE_PORT})", field=flag)
    return Address.parse(f"{ip}:{port}", f"{ENV_ORACLE_IP}/{ENV_ORACLE_PORT}")


def default_tuner_id() -> str:
    """A worker id unique across hosts: ``tuner-<host>-<pid>`` (never containing "chief")."""
    host = socket.gethostname().split(".")[0].replace("chief", "chf") or "host"
    return f"tuner-{host}-{os.getpid()}"


def _env_seconds(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise ConfigError(f"{name} must be a number of seconds above 0. Received: {raw!r}", field=name)
    return value
