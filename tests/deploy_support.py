"""Helpers for the deployment tests: podman, the images they build, the manifests they play.

Everything here runs real podman as root (deploy/podman-setup.sh installs it;
.ci/run calls that script). Names carry the test session's pid, so two
sessions on one machine never share a container, pod, secret or tag; and
every helper that starts something hands back what to remove.
"""

from __future__ import annotations

import base64
import copy
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import time
import zipfile
from collections.abc import Iterable, Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

import httpx
import yaml

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
BASE_IMAGE = "localhost/gateway-base:bookworm"
REDIS_IMAGE = "localhost/gateway-redis:bookworm"
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
SESSION = f"t{os.getpid()}"
GATEWAY_UID = 10001

# A Redis stand-in for the manifests' docker.io/library/redis (no registry
# here): Debian's redis-server on the base stand-in, run as Debian's redis user.
REDIS_CONTAINERFILE = f"""\
FROM {BASE_IMAGE}
RUN apt-get update -q >/dev/null \\
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends redis-server >/dev/null \\
 && rm -rf /var/lib/apt/lists/*
USER redis
CMD ["redis-server", "--save", "", "--appendonly", "no"]
"""


class CommandFailed(AssertionError):
    pass


def run(args: list[str], *, timeout: float = 120, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, input=input, errors="replace", check=False)
    if check and proc.returncode != 0:
        raise CommandFailed(
            f"{' '.join(args)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}"
        )
    return proc


def podman_unavailable() -> str | None:
    """Why podman cannot run here (a skip reason), or None when it can."""
    if os.geteuid() != 0:
        return "the container tests run podman as root (deploy/podman-setup.sh); this is not root"
    if shutil.which("podman") is None:
        return "no podman binary (bash deploy/podman-setup.sh installs podman, runc, debootstrap, catatonit)"
    proc = subprocess.run(["podman", "info", "--format", "{{.Host.OCIRuntime.Name}}"], capture_output=True, text=True,
                          timeout=60, check=False)
    if proc.returncode != 0:
        return f"podman cannot run here: {proc.stderr.strip()[-500:]}"
    return None


def free_port() -> int:
    with closing(socket.socket()) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def image_exists(ref: str) -> bool:
    return run(["podman", "image", "exists", ref], check=False).returncode == 0


def build_base_image() -> None:
    """deploy/base-image.sh: built once per machine (it does nothing when the image exists)."""
    run(["bash", str(DEPLOY / "base-image.sh"), BASE_IMAGE], timeout=900)


def build_args_for_ca() -> list[str]:
    """Outbound TLS here may pass a proxy only the host's CA bundle trusts: hand it to pip."""
    return ["--secret", f"id=ca_bundle,src={HOST_CA_BUNDLE}"] if HOST_CA_BUNDLE.exists() else []


def build_gateway_image(tag: str) -> str:
    """podman build of the repository's Dockerfile FROM the base stand-in; returns the image id."""
    iidfile = Path(f"/tmp/llm-gateway-{SESSION}.iid")
    run(
        [
            "podman", "build", "--network", "host", "--layers",
            "--build-arg", f"BASE_IMAGE={BASE_IMAGE}",
            *build_args_for_ca(),
            "--iidfile", str(iidfile), "-t", tag, str(REPO),
        ],
        timeout=900,
    )
    image_id = iidfile.read_text().strip()
    iidfile.unlink(missing_ok=True)
    return image_id


def build_redis_image() -> None:
    if not image_exists(REDIS_IMAGE):
        run(["podman", "build", "--network", "host", "-t", REDIS_IMAGE, "-f", "-", str(DEPLOY)],
            input=REDIS_CONTAINERFILE, timeout=600)


def image_size(ref: str) -> int:
    return int(run(["podman", "image", "inspect", "--format", "{{.Size}}", ref]).stdout.strip())


def image_config(ref: str) -> dict[str, Any]:
    data = json.loads(run(["podman", "image", "inspect", ref]).stdout)[0]
    return dict(data["Config"])


def wait_http(url: str, *, status: int = 200, timeout: float = 60, container: str | None = None) -> httpx.Response:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            response = httpx.get(url, timeout=2)
            if response.status_code == status:
                return response
            last = response.status_code
        except httpx.HTTPError as exc:
            last = exc
        if container is not None and container_state(container) not in ("running", "created", "configured"):
            break
        time.sleep(0.1)
    logs = container_logs(container) if container else ""
    raise AssertionError(f"{url} did not answer {status} (last: {last!r})\n{logs[-4000:]}")


def wait_until(predicate: Any, *, timeout: float = 10, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)
    return value


def container_state(name: str) -> str:
    proc = run(["podman", "inspect", "--format", "{{.State.Status}}", name], check=False)
    return proc.stdout.strip() if proc.returncode == 0 else "missing"


def container_logs(name: str) -> str:
    proc = run(["podman", "logs", name], check=False)
    return proc.stdout + proc.stderr


def container_pid(name: str) -> int:
    return int(run(["podman", "inspect", "--format", "{{.State.Pid}}", name]).stdout.strip())


def rss_bytes(pid: int) -> int:
    """VmRSS of a process in the container, read from the host's /proc (root)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def remove_containers(names: Iterable[str]) -> None:
    for name in names:
        # -v: with the anonymous volume the image's VOLUME gave a container run without -v.
        run(["podman", "rm", "-f", "-v", "-t", "0", name], check=False, timeout=60)


@contextmanager
def open_streams(port: int, count: int, token: str, prompt: str) -> Iterator[list[socket.socket]]:
    """``count`` streamed completions held open (each has sent its headers); closed on exit."""
    body = json.dumps(
        {"model": "claude-3-haiku-20240307", "max_tokens": 200, "stream": True,
         "messages": [{"role": "user", "content": prompt}]}
    ).encode()
    head = (
        "POST /v1/completions/anthropic-messages HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {token}\r\nX-Sourcegraph-Feature: chat_completions\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.create_connection(("127.0.0.1", port), timeout=30)
            sock.sendall(head + body)
            socks.append(sock)
        for sock in socks:
            first = sock.recv(4096)
            assert first.startswith(b"HTTP/1.1 200"), first[:300]
        yield socks
    finally:
        for sock in socks:
            sock.close()


# -- Kubernetes manifests under podman kube play ------------------------------------


def load_manifests(*names: str) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for name in names:
        docs += [d for d in yaml.safe_load_all((KUBERNETES / name).read_text()) if d]
    return docs


def b64(value: str) -> str:
    return base64.b64encode(value.encode()).decode()


def kube_play_documents(
    docs: list[dict[str, Any]],
    *,
    suffix: str,
    gateway_image: str,
    gateway_port: int,
    redis_port: int,
    actors_dir: Path,
    extra_env: dict[str, str],
) -> list[dict[str, Any]]:
    """The manifests as podman 4.3's ``kube play`` runs them on one host, changed as little as possible.

    - names get ``suffix`` (two test sessions side by side), one replica each;
    - images: the locally built gateway and the Redis stand-in;
    - host networking (the tests' machine has no CNI bridge): ports chosen free,
      the Redis address is 127.0.0.1 instead of the Service's DNS name, and
      ``ports:`` go (podman 4.3 would publish containerPort on the host
      network and refuse); probes keep their paths with a numeric port;
    - Service and PodDisruptionBudget stay in the file; kube play skips them;
    - the Secret is created by the test as a podman secret in the JSON form
      podman 4.3's secretKeyRef reads (it stores a played Secret as YAML, which
      its secretKeyRef then cannot read); the Secret's volume (actors.json),
      which podman 4.3 writes still base64-encoded, becomes a host directory
      holding the file.
    """
    out: list[dict[str, Any]] = []
    for original in docs:
        doc = copy.deepcopy(original)
        kind = doc["kind"]
        if kind == "Secret":
            continue
        doc["metadata"]["name"] += f"-{suffix}"
        out.append(doc)
        if kind != "Deployment":
            continue
        doc["spec"]["replicas"] = 1
        pod = doc["spec"]["template"]["spec"]
        for volume in pod.get("volumes", []):
            volume["name"] = f"{volume['name']}-{suffix}"
            if "configMap" in volume:
                volume["configMap"]["name"] += f"-{suffix}"
            if "secret" in volume:
                del volume["secret"]
                volume["hostPath"] = {"path": str(actors_dir), "type": "Directory"}
        for container in pod["containers"]:
            container.pop("ports", None)
            for mount in container.get("volumeMounts", []):
                mount["name"] = f"{mount['name']}-{suffix}"
            if container["name"] == "redis":
                container["image"] = REDIS_IMAGE
                args = container["args"]
                args[args.index("--port") + 1] = str(redis_port)
                for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                    if probe in container and "tcpSocket" in container[probe]:
                        container[probe]["tcpSocket"]["port"] = redis_port
                continue
            container["image"] = gateway_image
            for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                container[probe]["httpGet"]["port"] = gateway_port
            for env in container["env"]:
                if env["name"] == "PORT":
                    env["value"] = str(gateway_port)
                elif env["name"] == "REDIS_ENDPOINT":
                    env["value"] = re.sub(r"//[^/]+/", f"//127.0.0.1:{redis_port}/", env["value"])
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    ref["name"] += f"-{suffix}"
            container["env"] += [{"name": k, "value": v} for k, v in extra_env.items()]
    return out


# -- The compose specification's JSON schema, from package registries ---------------


def compose_schemas(workdir: Path) -> tuple[list[tuple[str, dict[str, Any]]], list[str]]:
    """The compose-spec JSON schema as shipped by registry packages, and why any could not be had.

    - npm ``dclint`` (a compose linter) ships the current specification's schema;
    - PyPI ``docker-compose==1.29.2`` ships the 2021 one (compose/config/compose_spec.json).
    """
    found: list[tuple[str, dict[str, Any]]] = []
    problems: list[str] = []
    npm = shutil.which("npm")
    if npm is None:
        problems.append("npm: not installed")
    else:
        proc = subprocess.run([npm, "pack", "dclint@3.1.0", "--silent", "--pack-destination", str(workdir)],
                              capture_output=True, text=True, timeout=120, cwd=workdir, check=False)
        tarball = workdir / "dclint-3.1.0.tgz"
        if proc.returncode == 0 and tarball.exists():
            with tarfile.open(tarball) as tar:
                member = tar.extractfile("package/schemas/compose.schema.json")
                assert member is not None
                found.append(("npm dclint@3.1.0 schemas/compose.schema.json", json.load(member)))
        else:
            problems.append(f"npm pack dclint@3.1.0: {proc.stderr.strip()[-300:]}")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-d", str(workdir),
         "docker-compose==1.29.2"],
        capture_output=True, text=True, timeout=180, check=False,
    )
    wheels = sorted(workdir.glob("docker_compose-1.29.2-*.whl"))
    if proc.returncode == 0 and wheels:
        with zipfile.ZipFile(wheels[0]) as wheel:
            found.append(("PyPI docker-compose==1.29.2 compose/config/compose_spec.json",
                          json.loads(wheel.read("compose/config/compose_spec.json"))))
    else:
        problems.append(f"pip download docker-compose==1.29.2: {proc.stderr.strip()[-300:]}")
    return found, problems
