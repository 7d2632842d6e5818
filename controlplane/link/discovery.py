"""Where the data planes are: `--dataplane` (a comma-separated list of HOST:PORT) and `--dataplane-dns`
(NAME:PORT: every address the name resolves to, re-resolved every `--dataplane-discovery-interval-s`,
as a Kubernetes headless Service publishes one address per ready pod)."""
from __future__ import annotations

import socket

import structlog

log = structlog.get_logger("controlplane.link.discovery")


def split_targets(spec: str) -> list[str]:
    """'a:1, b:2' -> ['a:1', 'b:2'] (order kept, duplicates dropped)."""
    targets = [t.strip() for t in spec.split(",") if t.strip()]
    return list(dict.fromkeys(targets))


def target_problem(target: str, flag: str) -> str | None:
    host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        return f"{flag} entries must be HOST:PORT with a port in [1, 65535], got {target!r}"
    return None


def resolve(name_port: str) -> list[str]:
    """Every address of NAME, as HOST:PORT targets, sorted; [] when the name does not resolve (yet)."""
    host, _, port = name_port.rpartition(":")
    try:
        infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        log.debug("data plane name does not resolve", name=host, error=str(e))
        return []
    addresses = {info[4][0] for info in infos}
    return sorted(f"[{a}]:{port}" if ":" in a else f"{a}:{port}" for a in addresses)


class Discovery:
    def __init__(self, static: str, dns: str = ""):
        self.static = split_targets(static)
        self.dns = dns

    def targets(self) -> list[str]:
        """The data planes there should be now: the static list, then what the DNS name resolves to."""
        found = resolve(self.dns) if self.dns else []
        return list(dict.fromkeys([*self.static, *found]))
