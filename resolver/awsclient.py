"""botocore clients built from the resolver's config alone, sized to a request's deadline.

botocore, not boto3: boto3 adds import time and resource models the resolver never uses. Every
setting comes from the resolver's config, none from the environment or ~/.aws. Retries are off
here: the gateway retries itself, within the deadline (resolver/gateway.py). The resolver
daemon keeps its clients for its lifetime (`keep_clients`): the handler builds one per request.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any, Protocol

from kmskeys import fileio
from resolver.backend import Timings
from resolver.errors import ConfigError

if TYPE_CHECKING:
    from resolver.config import Config

CONNECT_TIMEOUT_MAX = 1.0
MIN_ATTEMPT_SECONDS = 0.2


class _Kept:
    """The clients a long-running process keeps (keep_clients), by what they were built from."""

    clients: dict[tuple[object, ...], Any] | None = None
    lock: Any = None


def keep_clients() -> None:
    """From now on, this process keeps each client it builds for as long as the settings it was
    built from stay the same (the resolver daemon: one client per service and region)."""
    # threading only here: the handler, which builds a client per request, never loads it.
    import threading

    _Kept.lock = threading.Lock()
    _Kept.clients = {}


def warm_clients(config: Config) -> list[str]:
    """Build now one client per service the config reads (KMS; Secrets Manager and Parameter
    Store when it lists any) and configured region, which a process that keeps its clients
    keeps: what its first request would otherwise pay for. Why each one that failed did."""
    from resolver.spec_sm import SERVICE as SM
    from resolver.spec_ssm import SERVICE as SSM

    services = ["kms"]
    services += [SM] if config.sm_secrets else []
    services += [SSM] if config.ssm_parameters else []
    deadline = time.monotonic() + config.deadline
    problems = []
    for service in services:
        for region in config.regions:
            try:
                SessionClients(config).client(service, region, deadline, Timings())
            except Exception as exc:  # the request that needs it says why, in its own line
                problems.append(f"no {service} client for {region} yet: {exc}")
    return problems


class Clients(Protocol):
    """Where the gateway gets a botocore client of `service` in `region`."""

    def client(self, service: str, region: str, deadline: float, timings: Timings) -> Any:
        """A client whose timeouts fit `deadline` (time.monotonic())."""
        ...


class SessionClients:
    """A new botocore session and client for each call: the cold handler's, one per request."""

    def __init__(self, config: Config) -> None:
        self.config = config

    def client(self, service: str, region: str, deadline: float, timings: Timings) -> Any:
        """A client built now, its timeouts sized to what is left of `deadline`; in a process
        that keeps its clients, the one built before from the same settings."""
        kept = _Kept.clients
        if kept is None:
            return self._build(service, region, deadline, timings)
        # A kept client still holds its credentials: the file must be root's alone now too.
        creds = self.config.shared_credentials_file
        if creds is not None:
            check_credentials_file(creds)
        key = self._settings(service, region)
        with _Kept.lock:
            found = kept.get(key)
            if found is None:
                # Timeouts sized for a whole deadline, not for what is left of the request that
                # happens to build the client; the gateway bounds each attempt itself.
                whole = time.monotonic() + self.config.deadline
                found = kept[key] = self._build(service, region, whole, timings)
            return found

    def _settings(self, service: str, region: str) -> tuple[object, ...]:
        config = self.config
        creds = config.shared_credentials_file
        try:
            st = os.stat(creds) if creds is not None else None
        except OSError:
            st = None
        # A rewritten credentials file is read again: a new client.
        stamp = (st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size) if st is not None else None
        return (service, region, config.endpoint_url, creds, config.profile, config.deadline, stamp)

    def _build(self, service: str, region: str, deadline: float, timings: Timings) -> Any:
        start = time.perf_counter()
        from botocore.config import Config as BotoConfig
        from botocore.session import Session

        timings.add("import", (time.perf_counter() - start) * 1000)
        start = time.perf_counter()
        config = self.config
        session = Session()
        # Never ~/.aws/config: the resolver's settings come from its own file only.
        session.set_config_variable("config_file", os.devnull)
        creds = config.shared_credentials_file
        if creds is not None:
            check_credentials_file(creds)
        session.set_config_variable("credentials_file", os.fspath(creds) if creds else os.devnull)
        if config.profile:
            session.set_config_variable("profile", config.profile)
        remaining = deadline - time.monotonic()
        connect = max(0.1, min(CONNECT_TIMEOUT_MAX, remaining / 4))
        # A slow answer may use all the time that is left: the watchdog fires first, the read
        # timeout is only its backstop.
        read = max(MIN_ATTEMPT_SECONDS, remaining)
        # Credentials from the instance role come from IMDS: bound that fetch as well.
        session.set_config_variable("metadata_service_timeout", max(0.1, min(1.0, remaining / 4)))
        session.set_config_variable("metadata_service_num_attempts", 1)
        client = session.create_client(
            service,
            region_name=region,
            endpoint_url=endpoint_for(config, service),
            config=BotoConfig(
                connect_timeout=connect,
                read_timeout=read,
                retries={"total_max_attempts": 1, "mode": "standard"},
                user_agent_extra="kmskeys-resolver",
            ),
        )
        timings.add("client", (time.perf_counter() - start) * 1000)
        return client


# A service whose endpoint has a setting of its own (a VPC endpoint's DNS name serves one
# service); unset, `endpoint_url` serves it too.
ENDPOINT_SETTINGS = {"secretsmanager": "sm_endpoint_url", "ssm": "ssm_endpoint_url"}


def endpoint_for(config: Config, service: str) -> str | None:
    """The endpoint URL of `service` from the config; None: AWS's for the region."""
    own = ENDPOINT_SETTINGS.get(service)
    found = getattr(config, own) if own is not None else None
    return found if isinstance(found, str) else config.endpoint_url


def check_credentials_file(path: os.PathLike[str]) -> None:
    """Refuse a credentials file that is not root's alone (botocore then reads it by path)."""
    label = f"shared_credentials_file {os.fspath(path)}"
    try:
        fileio.check_path(path, label, fileio.REGULAR, fileio.FOLLOW | fileio.PRIVATE)
    except fileio.UntrustedFileError as exc:
        raise ConfigError(str(exc), refusal=exc) from None
