"""packaging/kubernetes: every manifest against the Kubernetes schemas, cross-checked with
the daemon's settings; the gateway's nginx.conf run for real, resolving each workspace's
Service through a DNS server of the test's own, in front of two daemons with fleet auth."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import kubernetes_validate
import pytest
import yaml
from aiohttp import web

from aetherd.app import create_app
from aetherd.settings import Settings, env_name
from aetherd.transport.auth import parse_key_set
from tests.fleet_support import (
    CLUSTER_SUFFIX,
    KUBERNETES,
    DnsStub,
    FleetDaemon,
    Gateway,
    Signer,
    common_port,
    gateway_nginx_conf,
    manifests,
    wait_all_ready,
)
from tests.support import REPO, connect, free_port

K8S_VERSION = "1.30.0"  # the oldest release with the preStop `sleep` action
WAIT = 30.0
MANIFESTS = sorted(
    p.name
    for p in KUBERNETES.glob("*.yaml")
    if p.name not in ("kustomization.yaml", "prometheus-scrape.yaml")
)
DEFAULTS = Settings(root=REPO, data_dir=REPO / "unused")


def _all_documents() -> list[dict[str, Any]]:
    return [doc for name in MANIFESTS for doc in manifests(name)]


def _one(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [
        d
        for d in _all_documents()
        if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]
    assert len(found) == 1, (kind, name, len(found))
    return found[0]


def _workspace_container() -> dict[str, Any]:
    pod = _one("StatefulSet")["spec"]["template"]["spec"]
    (container,) = [c for c in pod["containers"] if c["name"] == "aetherd"]
    return container


def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


# -- The manifests ----------------------------------------------------------------------


@pytest.mark.parametrize("version", [K8S_VERSION, kubernetes_validate.latest_version()])
def test_every_manifest_is_valid_against_the_kubernetes_schemas(version: str):
    documents = _all_documents()
    assert {d["kind"] for d in documents} >= {
        "Namespace", "ConfigMap", "Service", "StatefulSet", "Deployment", "Ingress",
        "NetworkPolicy",
    }  # fmt: skip
    for doc in documents:
        # strict: an unknown or misspelt field is an error, not silently dropped.
        kubernetes_validate.validate(doc, version, strict=True)
        assert doc["metadata"].get("namespace", "aetherd") == "aetherd"


def test_kustomization_lists_every_manifest():
    kustomization = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())
    assert kustomization["kind"] == "Kustomization"
    assert sorted(kustomization["resources"]) == MANIFESTS
    assert kustomization["namespace"] == "aetherd"


def test_the_workspace_matches_the_daemon_and_the_image():
    statefulset = _one("StatefulSet")
    pod = statefulset["spec"]["template"]
    container = _workspace_container()
    env = _env(container)
    port = DEFAULTS.port
    # Every AETHERD_* variable is a setting, and its value is one the daemon accepts.
    fields = {env_name(f): f for f in Settings.model_fields}
    values = {}
    for name, value in env.items():
        if name.startswith("AETHERD_"):
            assert name in fields, f"{name} is not a setting"
            if isinstance(value, str):
                values[fields[name]] = value
    assert int(values["port"]) == port == 3001
    Settings.model_validate(
        {**values, "root": REPO, "data_dir": REPO / "unused", "jwt_public_key_file": None}
    )
    # The workspace id comes from the label the Service selects on.
    assert env["AETHERD_WORKSPACE_ID"] == {
        "fieldRef": {"fieldPath": "metadata.labels['aetherd.dev/workspace']"}
    }
    assert pod["metadata"]["labels"]["aetherd.dev/workspace"] == "example"
    assert statefulset["metadata"]["name"] == "ws-example" and statefulset["spec"]["replicas"] == 1
    # Ports: container, Service, probes, Prometheus annotation, gateway all say 3001.
    assert container["ports"] == [{"name": "http", "containerPort": port}]
    service = _one("Service", "ws-example")
    assert service["spec"]["ports"][0]["port"] == port
    assert service["spec"]["selector"] == statefulset["spec"]["selector"]["matchLabels"]
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(port)
    assert f"{CLUSTER_SUFFIX}:{port};" in gateway_nginx_conf()
    # Probes hit routes the daemon serves.
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    app = create_app(DEFAULTS.model_copy(update={"token": "t" * 16}))
    paths = {r.get_info().get("path") for r in app.router.resources()}
    assert {"/readyz", "/healthz", pod["metadata"]["annotations"]["prometheus.io/path"]} <= paths
    # The image's entrypoint, and its user.
    dockerfile = (REPO / "packaging" / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["/opt/aetherd/bin/aetherd", "init"]' in dockerfile
    assert container["command"] == ["/opt/aetherd/bin/aetherd", "init"]
    assert "--uid 1000" in dockerfile and pod["spec"]["securityContext"]["runAsUser"] == 1000


def test_the_workspace_is_persistent_and_stops_in_time():
    statefulset = _one("StatefulSet")
    pod = statefulset["spec"]["template"]["spec"]
    container = _workspace_container()
    env = _env(container)
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    claim = statefulset["spec"]["volumeClaimTemplates"][0]["metadata"]["name"]
    # Root, data dir (transcripts) and home on the claim; the claim outlives scale-to-zero.
    for path in (env["AETHERD_ROOT"], env["AETHERD_DATA_DIR"], env["HOME"]):
        assert mounts[path]["name"] == claim
    assert statefulset["spec"]["persistentVolumeClaimRetentionPolicy"]["whenScaled"] == "Retain"
    init = pod["initContainers"][0]
    for mount in mounts.values():
        if mount["name"] == claim:
            assert f"/volume/{mount['subPath']}" in " ".join(init["command"])
    # The key file sits in the ConfigMap's directory mount, without subPath (a subPath
    # mount is never updated by the kubelet, so a rotation would not reach the daemon).
    key_file = Path(env["AETHERD_JWT_PUBLIC_KEY_FILE"])
    key_mount = mounts[str(key_file.parent)]
    assert "subPath" not in key_mount
    (volume,) = [v for v in pod["volumes"] if v["name"] == key_mount["name"]]
    configmap = _one("ConfigMap", volume["configMap"]["name"])
    keys = parse_key_set(configmap["data"][key_file.name].encode(), DEFAULTS.jwt_max_keys)
    assert keys and all(k.kid for k in keys)
    assert env["AETHERD_JWT_WORKSPACE_CLAIM"] and "AETHERD_TOKEN" not in env
    # Grace: the preStop pause, then the daemon's bounded shutdown, then a margin.
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + DEFAULTS.shutdown_timeout + 2
    # Non-root, nothing to escalate to, no capability, no API token for user shells.
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["automountServiceAccountToken"] is False
    for each in (container, init):
        security = each["securityContext"]
        assert security["allowPrivilegeEscalation"] is False
        assert security["capabilities"]["drop"] == ["ALL"]
        assert "add" not in security["capabilities"]
        assert each["resources"]["limits"]["memory"]


def test_gateway_timeouts_outlast_the_daemon_keepalive():
    conf = gateway_nginx_conf()
    for directive in ("proxy_read_timeout", "proxy_send_timeout"):
        values = re.findall(rf"{directive} (\d+)s;", conf)
        assert values and all(
            int(v) > DEFAULTS.ping_interval and int(v) > DEFAULTS.pong_timeout for v in values
        )
    ingress = _one("Ingress")["metadata"]["annotations"]
    assert int(ingress["nginx.ingress.kubernetes.io/proxy-read-timeout"]) > DEFAULTS.pong_timeout


def _relabel(rules: list[dict[str, Any]], labels: dict[str, str]) -> dict[str, str] | None:
    """Prometheus relabelling (keep, replace), as its documentation defines them."""
    labels = dict(labels)
    for rule in rules:
        value = rule.get("separator", ";").join(labels.get(s, "") for s in rule["source_labels"])
        match = re.fullmatch(rule.get("regex", "(.*)"), value)
        action = rule.get("action", "replace")
        if action == "keep":
            if not match:
                return None
        elif action == "replace":
            if match:
                replacement = rule.get("replacement", "$1")
                labels[rule["target_label"]] = match.expand(
                    re.sub(r"\$(\d+)", r"\\\1", replacement)
                )
        else:
            raise AssertionError(f"unexpected action {action}")
    return labels


def test_prometheus_discovers_workspaces_with_the_id_as_target_label():
    config = yaml.safe_load((KUBERNETES / "prometheus-scrape.yaml").read_text())
    (job,) = config["scrape_configs"]
    assert job["kubernetes_sd_configs"][0]["role"] == "pod"
    pod = _one("StatefulSet")["spec"]["template"]["metadata"]

    def meta(name: str) -> str:
        return re.sub(r"[^a-zA-Z0-9_]", "_", name)

    discovered = {
        "__address__": "10.1.2.3",
        "__metrics_path__": "/metrics",
        "__meta_kubernetes_namespace": "aetherd",
        "__meta_kubernetes_pod_name": "ws-example-0",
        "__meta_kubernetes_pod_ip": "10.1.2.3",
        **{f"__meta_kubernetes_pod_label_{meta(k)}": v for k, v in pod["labels"].items()},
        **{f"__meta_kubernetes_pod_annotation_{meta(k)}": v for k, v in pod["annotations"].items()},
    }
    target = _relabel(job["relabel_configs"], discovered)
    assert target is not None
    assert target["workspace"] == "example"
    assert target["__address__"] == f"10.1.2.3:{DEFAULTS.port}"
    assert target["__metrics_path__"] == "/metrics"
    # The gateway's pods carry no scrape annotation and no workspace label: dropped.
    gateway_pod = _one("Deployment")["spec"]["template"]["metadata"]
    assert (
        _relabel(
            job["relabel_configs"],
            {f"__meta_kubernetes_pod_label_{meta(k)}": v for k, v in gateway_pod["labels"].items()},
        )
        is None
    )


# -- The gateway, for real ----------------------------------------------------------------


@dataclass
class Fleet:
    gateway: Gateway
    dns: DnsStub
    signer: Signer
    daemons: dict[str, FleetDaemon]


@pytest.fixture
async def fleet(tmp_path: Path) -> AsyncIterator[Fleet]:
    signer = Signer()
    key_file = tmp_path / "keys.json"
    key_file.write_text(signer.jwks())
    addresses = {"alpha": "127.0.0.2", "beta": "127.0.0.3"}
    port = common_port(list(addresses.values()))
    preview = ("--preview-host", "{port}-{workspaceId}.preview.example.com")
    daemons = {
        wid: FleetDaemon(wid, address, port, tmp_path / wid, key_file, preview)
        for wid, address in addresses.items()
    }
    dns = await DnsStub(
        {f"ws-{wid}.{CLUSTER_SUFFIX}": address for wid, address in addresses.items()}
    ).start()
    gateway = None
    try:
        for daemon in daemons.values():
            daemon.start()
        gateway = Gateway(tmp_path / "nginx", free_port(), dns.port, port)
        await wait_all_ready(list(daemons.values()), WAIT)
        await gateway.wait_listening(WAIT)
        yield Fleet(gateway, dns, signer, daemons)
    finally:
        if gateway is not None:
            gateway.stop()
        for daemon in daemons.values():
            daemon.stop()
        dns.close()


async def _get(url: str, token: str | None = None, **kwargs: Any) -> tuple[int, str]:
    headers = kwargs.pop("headers", {})
    if token:
        headers["Authorization"] = f"Bearer {token}"
    async with (
        aiohttp.ClientSession() as session,
        session.get(url, headers=headers, allow_redirects=False, **kwargs) as resp,
    ):
        return resp.status, await resp.text()


@pytest.mark.slow
async def test_the_gateway_resolves_each_workspace_through_dns(fleet: Fleet):
    gateway, signer = fleet.gateway, fleet.signer
    for wid, daemon in fleet.daemons.items():
        token = signer.token(wid)
        # /info answers from the daemon bound to that workspace's address.
        status, body = await _get(gateway.url(f"/workspaces/{wid}/info"), token)
        assert status == 200 and f'"workspaceId":"{wid}"' in body.replace(" ", "")
        # The socket: a terminal's output comes back through the gateway.
        client = await connect(gateway.url(f"/workspaces/{wid}/ws", "ws"), None,
                               protocols=("Bearer", token))  # fmt: skip
        try:
            assert client.ws.protocol == "Bearer"
            marker = f"through-the-gateway-{wid}"
            reply = await client.request(
                "terminal", "create", sessionId="t1", command=f"echo {marker}; sleep 30"
            )
            assert reply["success"] is True, reply
            await client.expect(
                lambda f, m=marker: f.get("type") == "output" and m in f.get("data", ""), WAIT
            )
        finally:
            await client.close()
        # Files over HTTP: PUT, then GET the bytes back.
        payload = f"hello {wid}\n".encode() * 1000
        async with aiohttp.ClientSession() as session:
            url = gateway.url(f"/workspaces/{wid}/files/content")
            headers = {"Authorization": f"Bearer {token}"}
            async with session.put(url, params={"path": "/hello.txt"}, data=payload,
                                   headers=headers) as resp:  # fmt: skip
                assert resp.status in (200, 201), await resp.text()
            async with session.get(url, params={"path": "/hello.txt"}, headers=headers) as resp:
                assert resp.status == 200 and await resp.read() == payload
        assert (daemon.root / "hello.txt").read_bytes() == payload
    # Each name went through the resolver.
    assert all(fleet.dns.queries.get(f"ws-{wid}.{CLUSTER_SUFFIX}") for wid in fleet.daemons)


@pytest.mark.slow
async def test_the_gateway_keeps_workspaces_apart(fleet: Fleet):
    gateway, signer = fleet.gateway, fleet.signer
    # alpha's token is refused by beta (the `wid` claim), through the gateway.
    status, _ = await _get(gateway.url("/workspaces/beta/info"), signer.token("alpha"))
    assert status == 401
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await connect(gateway.url("/workspaces/beta/ws", "ws"), None,
                      protocols=("Bearer", signer.token("alpha")))  # fmt: skip
    assert info.value.status == 401
    # An expired token is refused.
    status, _ = await _get(gateway.url("/workspaces/alpha/info"), signer.token("alpha", -10))
    assert status == 401
    # A workspace without a Service (NXDOMAIN): the gateway's JSON 503.
    status, body = await _get(gateway.url("/workspaces/gamma/info"), signer.token("gamma"))
    assert status == 503 and body == '{"error":"Workspace unavailable"}'
    assert fleet.dns.queries.get(f"ws-gamma.{CLUSTER_SUFFIX}")
    # Ids that are not DNS labels never reach the resolver.
    for wid in ("alpha.aetherd", "Alpha", "-alpha", "a_b"):
        status, _ = await _get(gateway.url(f"/workspaces/{wid}/info"), signer.token(wid))
        assert status == 404, wid
    assert not any(
        name.startswith(("ws-alpha.aetherd.aetherd", "ws-a_b")) for name in fleet.dns.queries
    )
    # The access log shows paths, never a token.
    status, _ = await _get(
        gateway.url("/workspaces/alpha/info"), params={"token": signer.token("alpha")}
    )
    assert status == 200
    log = (gateway.prefix / "access.log").read_text()
    assert "/workspaces/alpha/info" in log and "eyJ" not in log


@pytest.mark.slow
async def test_preview_requests_reach_the_workspace_through_the_gateway(fleet: Fleet):
    # A dev server on localhost, as in a workspace.
    app = web.Application()

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text=f"dev server saw {request.path} host={request.host}")

    app.router.add_get("/{tail:.*}", hello)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        token = fleet.signer.token("alpha")
        # Path form. The port scanner reports the new port within a scan interval or so.
        url = fleet.gateway.url(f"/workspaces/alpha/ports/{port}/page")
        deadline = time.monotonic() + WAIT
        while True:
            status, body = await _get(url, token)
            if status != 404 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        assert status == 200 and body.startswith("dev server saw /page"), (status, body)
        # Host form: {port}-{id}.preview.example.com, resolved to the same workspace.
        status, body = await _get(
            fleet.gateway.url("/assets/app.js"),
            token,
            headers={"Host": f"{port}-alpha.preview.example.com"},
        )
        assert status == 200 and body.startswith("dev server saw /assets/app.js"), body
        # Without a token the private port is refused by the daemon, through the gateway.
        status, _ = await _get(url)
        assert status == 401
    finally:
        await runner.cleanup()
