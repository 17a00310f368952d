"""A fleet on loopback: daemons on their own 127.0.0.x address, a DNS server answering
for their Services, and the Kubernetes gateway's nginx.conf run by real nginx.

Shared by tests/test_kubernetes.py (two daemons) and bench/fleet.py (fifty).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
import yaml
from cryptography.hazmat.primitives.asymmetric import ec
from dnslib import QTYPE, RCODE, RR, A, DNSRecord

from tests.support import REPO, child_env

KUBERNETES = REPO / "packaging" / "kubernetes"
NAMESPACE = "aetherd"
CLUSTER_SUFFIX = f"{NAMESPACE}.svc.cluster.local"
GATEWAY_DNS = "kube-dns.kube-system.svc.cluster.local"
AUDIENCE = "aetherd"
CLAIM = "wid"


def manifests(name: str) -> list[dict[str, Any]]:
    """The documents of packaging/kubernetes/<name>."""
    return [d for d in yaml.safe_load_all((KUBERNETES / name).read_text()) if d]


def gateway_nginx_conf() -> str:
    """nginx.conf from the gateway's ConfigMap, exactly as deployed."""
    for doc in manifests("gateway.yaml"):
        if doc["kind"] == "ConfigMap":
            return str(doc["data"]["nginx.conf"])
    raise AssertionError("gateway.yaml has no ConfigMap with nginx.conf")


def loopback_gateway_conf(
    prefix: Path, listen_port: int, dns_port: int, daemon_port: int, workers: int = 1
) -> str:
    """The deployed nginx.conf with only what differs on one machine replaced: where it
    listens, its resolver, the daemons' port, the file paths, and the worker count."""
    conf = gateway_nginx_conf()
    replacements = {
        "/tmp/": f"{prefix}/",  # first: the paths below are under /tmp too
        "worker_processes auto;": f"worker_processes {workers};",
        "listen 8080;": f"listen 127.0.0.1:{listen_port};",
        f"resolver {GATEWAY_DNS} ": f"resolver 127.0.0.1:{dns_port} ",
        f"{CLUSTER_SUFFIX}:3001;": f"{CLUSTER_SUFFIX}:{daemon_port};",
        "/dev/stdout": str(prefix / "access.log"),
        "/dev/stderr": str(prefix / "error.log"),
    }
    for old, new in replacements.items():
        assert old in conf, f"gateway nginx.conf no longer holds {old!r}"
        conf = conf.replace(old, new)
    if os.geteuid() == 0:
        # As root, workers would drop to `nobody`, who cannot reach pytest's 0700 tmp dirs.
        conf = "user root;\n" + conf
    return conf


class DnsStub:
    """Answers A queries for the names in `records` (case-insensitive), NXDOMAIN for the
    rest. UDP on 127.0.0.1, served from a thread of its own so that a busy event loop
    (a benchmark opening hundreds of sockets) never makes nginx's resolver time out;
    `queries` counts the questions per name."""

    def __init__(self, records: dict[str, str]) -> None:
        self.records = {k.lower().rstrip("."): v for k, v in records.items()}
        self.queries: dict[str, int] = {}
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)  # how often the thread looks at `stopping`
        self.port = int(self.sock.getsockname()[1])
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._serve, name="dns-stub", daemon=True)

    async def start(self) -> DnsStub:
        self.thread.start()
        return self

    def _serve(self) -> None:
        while not self.stopping.is_set():
            try:
                data, addr = self.sock.recvfrom(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            reply = self.answer(data)
            if reply is not None:
                self.sock.sendto(reply, addr)

    def answer(self, data: bytes) -> bytes | None:
        try:
            request = DNSRecord.parse(data)
        except Exception:
            return None
        reply = request.reply()
        name = str(request.q.qname).lower().rstrip(".")
        self.queries[name] = self.queries.get(name, 0) + 1
        address = self.records.get(name)
        if address is None:
            reply.header.rcode = RCODE.NXDOMAIN
        elif request.q.qtype == QTYPE.A:
            reply.add_answer(RR(request.q.qname, QTYPE.A, rdata=A(address), ttl=30))
        return bytes(reply.pack())

    def close(self) -> None:
        self.stopping.set()
        if self.thread.is_alive():
            self.thread.join(5)
        self.sock.close()


class Signer:
    """The control plane's signing key (ES256) and its JWKS for the daemons."""

    def __init__(self, kid: str = "fleet-1") -> None:
        self.kid = kid
        self.private = ec.generate_private_key(ec.SECP256R1())

    def jwks(self) -> str:
        entry = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(self.private.public_key()))
        entry.update(kid=self.kid, use="sig", alg="ES256")
        return json.dumps({"keys": [entry]})

    def token(self, workspace_id: str, lifetime: float = 600) -> str:
        claims = {
            "sub": "user-1",
            "aud": AUDIENCE,
            CLAIM: workspace_id,
            "exp": int(time.time() + lifetime),
        }
        return jwt.encode(claims, self.private, algorithm="ES256", headers={"kid": self.kid})


def usable_loopback(address: str, port: int) -> bool:
    """Whether `address:port` can be bound (Linux routes all of 127.0.0.0/8 to lo)."""
    with socket.socket() as sock:
        try:
            sock.bind((address, port))
        except OSError:
            return False
    return True


def common_port(addresses: list[str], attempts: int = 50) -> int:
    """A port free on every address: the gateway's proxy_pass fixes one port for all."""
    for _ in range(attempts):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if all(usable_loopback(a, port) for a in addresses):
            return port
    raise RuntimeError("no port free on every loopback address")


@dataclass
class FleetDaemon:
    """`python -m aetherd serve` for one workspace, on its own loopback address, with
    the fleet's JWT auth and no static token."""

    workspace_id: str
    address: str
    port: int
    base: Path
    key_file: Path
    extra: tuple[str, ...] = ()
    proc: subprocess.Popen[bytes] | None = None
    log: Path = field(init=False)

    def __post_init__(self) -> None:
        self.root = self.base / "root"
        self.data_dir = self.base / "data"
        self.home = self.base / "home"
        self.log = self.base / "daemon.log"
        for path in (self.root, self.home):
            path.mkdir(parents=True, exist_ok=True)

    def argv(self) -> list[str]:
        return [
            sys.executable, "-m", "aetherd", "serve",
            "--host", self.address,
            "--port", str(self.port),
            "--workspace-id", self.workspace_id,
            "--root", str(self.root),
            "--data-dir", str(self.data_dir),
            "--jwt-public-key-file", str(self.key_file),
            "--jwt-audience", AUDIENCE,
            "--jwt-workspace-claim", CLAIM,
            "--log-format", "json",
            *self.extra,
        ]  # fmt: skip

    def start(self) -> None:
        # An empty HOME: no user dotfiles (root's .bashrc here costs 180 ms per shell).
        env = child_env(self.home, HOME=str(self.home))
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                self.argv(), env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log
            )

    def ready(self) -> bool:
        try:
            with socket.create_connection((self.address, self.port), timeout=1) as sock:
                sock.sendall(b"GET /readyz HTTP/1.0\r\nHost: x\r\n\r\n")
                return sock.recv(64).split(b" ")[1:2] == [b"200"]
        except OSError:
            return False

    def stop(self, timeout: float = 30) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(5)


async def wait_all_ready(daemons: list[FleetDaemon], timeout: float) -> None:
    """Poll every daemon's /readyz (bounded by `timeout`) until all answer 200."""
    deadline = time.monotonic() + timeout
    pending = list(daemons)
    while pending:
        for daemon in pending:
            assert daemon.proc is not None
            if daemon.proc.poll() is not None:
                raise RuntimeError(
                    f"{daemon.workspace_id} exited: {daemon.log.read_text()[-2000:]}"
                )
        pending = [d for d in pending if not await asyncio.to_thread(d.ready)]
        if pending:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(pending)} daemons not ready within {timeout} s")
            await asyncio.sleep(0.05)


def nginx_binary() -> str:
    binary = shutil.which("nginx") or (
        "/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None
    )
    if binary is None:
        raise RuntimeError("nginx is required (Debian package nginx; .ci/run installs it)")
    return binary


class Gateway:
    """The gateway's nginx.conf run by nginx in the foreground on 127.0.0.1."""

    def __init__(self, prefix: Path, listen_port: int, dns_port: int, daemon_port: int,
                 workers: int = 1) -> None:  # fmt: skip
        self.prefix = prefix
        self.port = listen_port
        prefix.mkdir(parents=True, exist_ok=True)
        conf = prefix / "nginx.conf"
        conf.write_text(loopback_gateway_conf(prefix, listen_port, dns_port, daemon_port, workers))
        self.proc = subprocess.Popen(
            [nginx_binary(), "-p", str(prefix), "-e", str(prefix / "error.log"),
             "-c", str(conf), "-g", "daemon off;"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip

    def url(self, path: str, scheme: str = "http") -> str:
        return f"{scheme}://127.0.0.1:{self.port}{path}"

    async def wait_listening(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                assert self.proc.stderr is not None
                raise RuntimeError(f"nginx exited: {self.proc.stderr.read().decode()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError("nginx never listened") from None
                await asyncio.sleep(0.05)

    def pids(self) -> list[int]:
        """The master and its workers."""
        import psutil

        master = psutil.Process(self.proc.pid)
        return [master.pid, *(c.pid for c in master.children())]

    def stop(self, timeout: float = 30) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        if self.proc.stderr is not None:
            self.proc.stderr.close()
