"""Discovery: --dataplane's list, then every address a --dataplane-dns name resolves to, looked up afresh each time
(a headless Service's records change as pods come and go). The resolver is the system's, fed records here."""
import socket

from controlplane.link.discovery import Discovery, split_targets, target_problem


def records(monkeypatch, answers: dict[str, list[str]]) -> None:
    def getaddrinfo(host, port, *args, **kwargs):
        if host not in answers:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port))
                for a in answers[host]]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


def test_a_name_gives_every_address_and_is_resolved_again_each_time(monkeypatch):
    answers = {}
    records(monkeypatch, answers)
    discovery = Discovery("static:1", "planes.ns.svc:50061")
    assert discovery.targets() == ["static:1"]  # the name does not resolve yet: no pod is ready
    answers["planes.ns.svc"] = ["10.0.0.7", "10.0.0.3", "10.0.0.7", "fd00::5"]
    assert discovery.targets() == ["static:1", "10.0.0.3:50061", "10.0.0.7:50061", "[fd00::5]:50061"]
    answers["planes.ns.svc"] = ["10.0.0.3"]  # a pod left
    assert discovery.targets() == ["static:1", "10.0.0.3:50061"]


def test_target_lists_and_their_errors():
    assert split_targets(" a:1, b:2,,a:1 ") == ["a:1", "b:2"]
    assert target_problem("a:1", "--dataplane") is None
    assert "HOST:PORT" in target_problem("a", "--dataplane") and "'b:0'" in target_problem("b:0", "--dataplane-dns")
