"""The deployment files read as data: Dockerfile, Kubernetes, Cloud Run, compose.

No container runs here (tests/test_deploy_image.py runs them): these check
what the platforms rely on and what podman cannot show, and that every
setting the files pass to the gateway is one it knows, with a valid value.
The compose file is validated against the compose specification's JSON schema
as shipped by registry packages (npm dclint, PyPI docker-compose).
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from actors.static import parse_actors_file
from conf.loader import _leaves, env_names, load_config, load_schema, resolve_path
from tests.deploy_support import (
    DEPLOY,
    GATEWAY_UID,
    REPO,
    compose_schemas,
    load_manifests,
)

DOCKERFILE = (REPO / "Dockerfile").read_text()
STATE_DIR = "/var/lib/gateway"
PROBE_PATHS = {"/-/readyz", "/-/livez"}


def known_env_names() -> set[str]:
    schema = load_schema()
    names = {name for path, leaf in _leaves(schema) for name in env_names(path, leaf)}
    # Read by the gateway outside the schema.
    return names | {"PROMETHEUS_MULTIPROC_DIR", "CODY_GATEWAY_UVLOOP", "CODY_GATEWAY_VERSION"}


def dockerfile_env() -> dict[str, str]:
    """The ENV of the Dockerfile's final stage."""
    final = DOCKERFILE.rsplit("\nFROM ", 1)[1]
    match = re.search(r"^ENV ((?:.*\\\n)*.*)$", final, re.MULTILINE)
    assert match
    pairs = re.findall(r"(\w+)=(\S+)", match.group(1).replace("\\\n", " "))
    return dict(pairs)


def parse_actors(text: str) -> dict[str, Any]:
    return parse_actors_file(text, source="static", concurrency_percentage=50, concurrency_interval_s=10)


def gateway_effective_config(toml_text: str, env: dict[str, str], tmp_path: Path) -> Any:
    config_file = tmp_path / "gateway.toml"
    config_file.write_text(toml_text)
    return load_config(config_file, environ=env)


# -- Dockerfile and .dockerignore ----------------------------------------------------


def test_dockerfile_base_image_secret_user_volume_and_signal() -> None:
    base = re.search(r"^ARG BASE_IMAGE=(\S+)$", DOCKERFILE, re.MULTILINE)
    assert base, "ARG BASE_IMAGE with a default"
    version = re.fullmatch(r"python:3\.(\d+)-slim(?:-\w+)?", base.group(1))
    assert version, base.group(1)
    supported = re.search(r"Python 3\.(\d+)\+", (REPO / "requirements.txt").read_text())
    assert supported and int(version.group(1)) >= int(supported.group(1))
    assert DOCKERFILE.count("FROM ${BASE_IMAGE}") == 2  # builder and final stage
    # The CA bundle is an optional build secret that pip uses when it is there.
    assert "--mount=type=secret,id=ca_bundle" in DOCKERFILE
    assert re.search(r'if \[ -s /run/secrets/ca_bundle \]; then export PIP_CERT=/run/secrets/ca_bundle; fi', DOCKERFILE)
    assert re.search(rf"^USER {GATEWAY_UID}:{GATEWAY_UID}$", DOCKERFILE, re.MULTILINE)
    assert re.search(rf'^VOLUME \["{STATE_DIR}"\]$', DOCKERFILE, re.MULTILINE)
    assert re.search(r"^STOPSIGNAL SIGTERM$", DOCKERFILE, re.MULTILINE)
    assert re.search(r"^EXPOSE 9992$", DOCKERFILE, re.MULTILINE)
    env = dockerfile_env()
    assert env["CODY_GATEWAY_HOST"] == "0.0.0.0"
    assert "PORT" not in env  # the gateway's default 9992, or the platform's $PORT
    for name in env:
        assert name in known_env_names() or name in ("PATH", "PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE"), name
    # /app/var, where the built-in config's relative state paths point, is the volume.
    assert re.search(rf"ln -s {STATE_DIR} /app/var$", DOCKERFILE, re.MULTILINE)
    assert re.search(r"^WORKDIR /app$", DOCKERFILE, re.MULTILINE)


def test_image_config_defaults_keep_state_under_var() -> None:
    """The built-in config in the image (/app = the repository root): its state paths are all under var/."""
    env = {k: v for k, v in dockerfile_env().items() if k.startswith("CODY_GATEWAY_")}
    config = load_config(None, environ=env)
    assert config.host == "0.0.0.0" and config.port == 9992
    assert Path(config.base_dir) == REPO
    for value in (config.events.file, config.events.spool_dir):
        assert resolve_path(config, value).parent == REPO / "var", value
    assert resolve_path(config, config.actors.static_file).exists()


def test_dockerignore_keeps_development_files_out() -> None:
    patterns = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")}
    for excluded in ("tests", "bench", "docs", "deploy", ".git", "var", "**/__pycache__"):
        assert excluded in patterns, excluded
    # The demo's fake provider goes in; the other test doubles do not.
    assert {"fakes/*", "!fakes/__init__.py", "!fakes/provider.py"} <= patterns
    gateway = (REPO / "gateway.py").read_text()
    assert "from fakes.provider import" in gateway, "--demo's import moved: update .dockerignore"


# -- Kubernetes ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kube() -> dict[tuple[str, str], dict[str, Any]]:
    docs = load_manifests("gateway.yaml", "redis.yaml", "secrets.example.yaml")
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


def gateway_container(kube: dict[tuple[str, str], dict[str, Any]]) -> dict[str, Any]:
    containers = kube[("Deployment", "llm-gateway")]["spec"]["template"]["spec"]["containers"]
    assert [c["name"] for c in containers] == ["gateway"]
    return dict(containers[0])


def test_kubernetes_probes_grace_period_and_security(kube: dict[tuple[str, str], dict[str, Any]], tmp_path: Path) -> None:
    deployment = kube[("Deployment", "llm-gateway")]
    pod = deployment["spec"]["template"]["spec"]
    container = gateway_container(kube)
    port = container["ports"][0]
    assert port == {"name": "http", "containerPort": 9992}
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["PORT"] == "9992"
    assert container["readinessProbe"]["httpGet"] == {"path": "/-/readyz", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/-/livez", "port": "http"}
    assert container["startupProbe"]["httpGet"] == {"path": "/-/readyz", "port": "http"}
    # A drain takes the pod out of rotation at the next readiness check.
    readiness = container["readinessProbe"]
    assert readiness["failureThreshold"] * readiness["periodSeconds"] <= 5

    # The grace period covers the preStop pause, the drain and the flush.
    config = tomllib.loads(kube[("ConfigMap", "llm-gateway-config")]["data"]["gateway.toml"])
    drain = config["server"]["drain_timeout_s"]
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    assert pod["terminationGracePeriodSeconds"] >= int(pre_stop[1]) + drain + 10

    security = pod["securityContext"]
    assert security["runAsNonRoot"] is True and security["runAsUser"] == GATEWAY_UID
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts[STATE_DIR]], "the state directory on an emptyDir"
    assert "emptyDir" in volumes[mounts["/tmp"]]
    resources = container["resources"]
    assert {"cpu", "memory"} <= set(resources["requests"]) and "memory" in resources["limits"]


def test_kubernetes_config_map_and_environment_make_a_valid_config(
    kube: dict[tuple[str, str], dict[str, Any]], tmp_path: Path
) -> None:
    container = gateway_container(kube)
    assert container["args"][0] == "--config"
    config_path = Path(container["args"][1])
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    pod = kube[("Deployment", "llm-gateway")]["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    config_map_name = volumes[mounts[str(config_path.parent)]]["configMap"]["name"]
    toml_text = kube[("ConfigMap", config_map_name)]["data"][config_path.name]

    known = known_env_names()
    env: dict[str, str] = {k: v for k, v in dockerfile_env().items() if k.startswith("CODY_GATEWAY_")}
    secret = kube[("Secret", "llm-gateway-secrets")]
    for item in container["env"]:
        assert item["name"] in known, f"{item['name']} is no setting of the gateway"
        if "value" in item:
            env[item["name"]] = item["value"]
        else:
            ref = item["valueFrom"]["secretKeyRef"]
            assert ref["name"] == "llm-gateway-secrets"
            if not ref.get("optional"):
                assert ref["key"] in secret["stringData"], ref
            env[item["name"]] = secret["stringData"].get(ref["key"], "x")
    config = gateway_effective_config(toml_text, env, tmp_path)
    assert config.environment == "production"
    assert config.redis.endpoint == "redis://redis:6379/0"
    assert config.actors.static_file == "/etc/gateway/actors/actors.json"
    assert config.events.file.startswith(STATE_DIR + "/") and config.events.spool_dir.startswith(STATE_DIR + "/")
    # The actors file comes from the Secret's actors.json, mounted where the setting points.
    actors_volume = volumes[mounts["/etc/gateway/actors"]]["secret"]
    assert actors_volume["secretName"] == "llm-gateway-secrets"
    assert actors_volume["items"] == [{"key": "actors.json", "path": "actors.json"}]
    assert parse_actors(secret["stringData"]["actors.json"])


def test_kubernetes_service_pdb_and_redis_select_the_right_pods(kube: dict[tuple[str, str], dict[str, Any]]) -> None:
    deployment = kube[("Deployment", "llm-gateway")]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    service = kube[("Service", "llm-gateway")]
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    pdb = kube[("PodDisruptionBudget", "llm-gateway")]
    assert pdb["apiVersion"] == "policy/v1"
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["minAvailable"] < deployment["spec"]["replicas"]

    redis = kube[("Deployment", "redis")]
    redis_labels = redis["spec"]["template"]["metadata"]["labels"]
    redis_service = kube[("Service", "redis")]
    assert redis_service["spec"]["selector"].items() <= redis_labels.items()
    endpoint = next(e["value"] for e in gateway_container(kube)["env"] if e["name"] == "REDIS_ENDPOINT")
    host, port = re.fullmatch(r"redis://([\w.-]+):(\d+)/\d+", endpoint).groups()  # type: ignore[union-attr]
    assert host == redis_service["metadata"]["name"] and int(port) == redis_service["spec"]["ports"][0]["port"]
    args = redis["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--port") + 1] == port


def test_kustomization_lists_the_manifests_but_not_the_example_secret() -> None:
    kustomization = yaml.safe_load((DEPLOY / "kubernetes" / "kustomization.yaml").read_text())
    assert set(kustomization["resources"]) == {"redis.yaml", "gateway.yaml"}
    for name in kustomization["resources"]:
        assert (DEPLOY / "kubernetes" / name).exists()


# -- Cloud Run ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cloud_run() -> dict[str, Any]:
    docs = [d for d in yaml.safe_load_all((DEPLOY / "cloudrun" / "service.yaml").read_text()) if d]
    assert len(docs) == 1
    return dict(docs[0])


def test_cloud_run_service_fields_we_rely_on(cloud_run: dict[str, Any], tmp_path: Path) -> None:
    assert cloud_run["apiVersion"] == "serving.knative.dev/v1"
    assert cloud_run["kind"] == "Service"
    template = cloud_run["spec"]["template"]
    annotations = template["metadata"]["annotations"]
    min_scale = int(annotations["autoscaling.knative.dev/minScale"])
    max_scale = int(annotations["autoscaling.knative.dev/maxScale"])
    assert 1 <= min_scale < max_scale
    assert re.fullmatch(r"projects/[\w-]+/locations/[\w-]+/connectors/[\w-]+",
                        annotations["run.googleapis.com/vpc-access-connector"])
    assert annotations["run.googleapis.com/vpc-access-egress"] in ("private-ranges-only", "all-traffic")
    assert annotations["run.googleapis.com/cpu-throttling"] == "false"
    spec = template["spec"]
    assert 1 <= spec["containerConcurrency"] <= 1000  # Cloud Run's range
    assert spec["timeoutSeconds"] * 1000 > 600_000  # upstream.max_timeout_ms: a long stream is not cut
    [container] = spec["containers"]
    [port] = container["ports"]
    assert port["containerPort"] == 9992 and port.get("name", "http1") == "http1"
    assert container["startupProbe"]["httpGet"]["path"] == "/-/readyz"
    assert container["startupProbe"]["httpGet"].get("port", 9992) == 9992
    assert container["livenessProbe"]["httpGet"]["path"] == "/-/livez"
    assert float(container["resources"]["limits"]["cpu"]) >= 1
    env_names_used = [e["name"] for e in container["env"]]
    assert "PORT" not in env_names_used  # Cloud Run sets it (and refuses it here)
    known = known_env_names()
    env: dict[str, str] = {k: v for k, v in dockerfile_env().items() if k.startswith("CODY_GATEWAY_")}
    secret_refs = {}
    for item in container["env"]:
        assert item["name"] in known, f"{item['name']} is no setting of the gateway"
        if "valueFrom" in item:
            ref = item["valueFrom"]["secretKeyRef"]
            # Secret Manager: the secret's name and a version (a number or "latest").
            assert re.fullmatch(r"[\w-]+", ref["name"]) and re.fullmatch(r"\d+|latest", ref["key"]), ref
            secret_refs[item["name"]] = ref
            env[item["name"]] = "redis://10.0.0.3:6379/0" if item["name"] == "REDIS_ENDPOINT" else "x"
        else:
            env[item["name"]] = item["value"]
    assert {"REDIS_ENDPOINT", "CODY_GATEWAY_DIAGNOSTICS_SECRET", "CODY_GATEWAY_ANTHROPIC_ACCESS_TOKEN"} <= set(secret_refs)
    config = load_config(None, environ=env)
    assert config.events.bigquery_project_id and config.events.sink == "auto"
    # Cloud Run kills 10 s after SIGTERM: the drain and the event flush (up to 5 s after it) fit in it.
    assert config.server.drain_timeout_s + 5 < 10
    # The actors file: a Secret Manager secret mounted where the setting points.
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    [volume] = spec["volumes"]
    [item] = volume["secret"]["items"]
    assert re.fullmatch(r"\d+|latest", item["key"])
    assert f"{mounts[volume['name']]}/{item['path']}" == config.actors.static_file


# -- compose ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return dict(yaml.safe_load((DEPLOY / "compose.yaml").read_text()))


@pytest.fixture(scope="module")
def compose_spec_schemas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[tuple[str, dict[str, Any]]]]:
    found, problems = compose_schemas(tmp_path_factory.mktemp("compose-spec"))
    if not found:
        pytest.skip("could not download the compose specification's schema: " + "; ".join(problems))
    yield found


@pytest.mark.timeout(300)
def test_compose_file_is_valid_against_the_compose_specification(
    compose: dict[str, Any], compose_spec_schemas: list[tuple[str, dict[str, Any]]]
) -> None:
    for source, schema in compose_spec_schemas:
        # Their $schema URIs are not the canonical ones: pick the draft by hand.
        draft = jsonschema.Draft7Validator if "draft-07" in schema.get("$schema", "") else jsonschema.Draft201909Validator
        draft.check_schema(schema)
        errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in draft(schema).iter_errors(compose)]
        assert not errors, f"{source}:\n" + "\n".join(errors)


def test_compose_wires_redis_the_collector_and_the_state_volume(compose: dict[str, Any], tmp_path: Path) -> None:
    services = compose["services"]
    assert set(services) == {"gateway", "redis", "otel-collector"}
    gateway = services["gateway"]
    assert (DEPLOY / gateway["build"]["context"] / gateway["build"]["dockerfile"]).resolve() == REPO / "Dockerfile"
    env = gateway["environment"]
    assert env["REDIS_ENDPOINT"] == "redis://redis:6379/0"
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector:4318"
    known = known_env_names()
    assert set(env) <= known, set(env) - known
    assert gateway["depends_on"]["redis"]["condition"] == "service_healthy"
    volumes = {v.split(":")[1]: v.split(":")[0] for v in gateway["volumes"]}  # target: source
    assert volumes[STATE_DIR] in compose["volumes"]
    actors_file = DEPLOY / volumes[env["CODY_GATEWAY_STATIC_ACTORS_FILE"]]
    assert parse_actors(actors_file.read_text())
    assert "/-/readyz" in " ".join(gateway["healthcheck"]["test"])
    grace = re.fullmatch(r"(\d+)s", gateway["stop_grace_period"])
    assert grace and int(grace.group(1)) > 30  # server.drain_timeout_s (default 30) + the flush
    # Every variable the gateway gets is valid for it (interpolations as the empty string).
    resolved = {k: re.sub(r"\$\{[^}:]+:-([^}]*)\}", r"\1", str(v)) for k, v in env.items()}
    resolved["CODY_GATEWAY_STATIC_ACTORS_FILE"] = str(actors_file)
    load_config(None, environ=resolved)

    collector = services["otel-collector"]
    assert collector["image"].startswith("otel/opentelemetry-collector:")
    source, target = collector["volumes"][0].split(":")[:2]
    assert any(arg == f"--config={target}" for arg in collector["command"])
    collector_config = yaml.safe_load((DEPLOY / source).read_text())
    assert collector_config["receivers"]["otlp"]["protocols"]["http"]["endpoint"].endswith(":4318")
    pipeline = collector_config["service"]["pipelines"]["traces"]
    assert pipeline["receivers"] == ["otlp"]
    assert set(pipeline["exporters"]) <= set(collector_config["exporters"])
