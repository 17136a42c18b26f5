"""The production deployment (docker/, docs/cluster.md), proven without a container engine.

Static: docker/compose.yaml is valid against the Compose specification's JSON schema (the copy
that the check-jsonschema package ships), publishes nothing beyond the host's 127.0.0.1 and has no
working default secret; the KubeRay RayJob is valid against the RayJob fields it uses
(tests/data/rayjob-v1.schema.yaml); both images install from the pinned constraints.txt, the
platform image through `make setup` itself.

Live: the service scripts that compose runs (docker/services/*.sh), with the environment compose
gives each service (read from compose.yaml, with the other services' names pointed at
127.0.0.1), run as plain processes in a private network namespace that has nothing but a
loopback interface: the test's stand-in for the compose network, which also keeps the test off
the ports and Ray clusters of anyone else on this machine. The Ray head and a worker node (token
auth), the MLflow server (basic auth, PostgreSQL, S3 artifacts) and the object store (moto's S3
server in place of MinIO, which has no Python package) take the smoke sweep through
`ray job submit`; runs and artifacts must arrive, unauthenticated requests must be refused, and
every listening socket must be on loopback. PostgreSQL is the test server (`make test` / .ci/run
set DUOSPARSE_TEST_POSTGRES_URI), reached from inside the namespace through a relay that listens
on a Unix socket only. Creating a network namespace needs root (as CI runs) or unprivileged user
namespaces.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import ipaddress
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import jsonschema
import psutil
import pytest
import yaml
from conftest import postgres_uri, require

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
SERVICES = DOCKER / "services"
BIN = Path(sys.executable).parent
COMPOSE_FILE = DOCKER / "compose.yaml"
RAYJOB_FILE = DOCKER / "kuberay" / "rayjob.yaml"
SMOKE_TRIALS = 4  # sweeps/smoke.yaml

# --- Compose: reading the file as compose does ----------------------------------------------


def load_compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def template_env() -> dict[str, str]:
    """docker/.env.template as KEY -> value (secrets are empty there)."""
    env = {}
    for line in (DOCKER / ".env.template").read_text().splitlines():
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            env[key] = value
    return env


def template_secrets() -> list[str]:
    keys, section = [], None
    for line in (DOCKER / ".env.template").read_text().splitlines():
        if line.startswith("# --- "):
            section = line[6:].split()[0]
        elif section == "secrets" and re.match(r"^[A-Z0-9_]+=", line):
            keys.append(line.split("=", 1)[0])
    return keys


_VAR = re.compile(
    r"\$(?:(\$)|\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|([A-Za-z_][A-Za-z0-9_]*))"
)


def interpolate(value, env: dict[str, str]):
    """Compose's variable interpolation: $$, $VAR, ${VAR}, ${VAR:-default}, ${VAR-default},
    ${VAR:?error}, ${VAR?error}, applied to every string of a parsed compose tree."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(match: re.Match) -> str:
        if match.group(1):
            return "$"
        name = match.group(2) or match.group(5)
        op, arg = match.group(3), match.group(4)
        current = env.get(name)
        unset = current is None or (current == "" and op and op.startswith(":"))
        if op in (":-", "-"):
            return arg if unset else current
        if op in (":?", "?"):
            if unset:
                raise KeyError(f"required variable {name} is missing a value: {arg}")
            return current
        return current or ""

    return _VAR.sub(one, value)


def filled_env(**overrides: str) -> dict[str, str]:
    env = template_env()
    env.update({key: secrets.token_hex(16) for key in template_secrets()})
    env.update(overrides)
    return env


def service_env(compose: dict, name: str) -> dict[str, str]:
    env = compose["services"][name].get("environment") or {}
    assert isinstance(env, dict), f"{name}: environment as a mapping, please"
    return {k: "" if v is None else str(v) for k, v in env.items()}


def service_script(compose: dict, name: str) -> Path:
    """The docker/services script that is the service's command (or entrypoint)."""
    service = compose["services"][name]
    command = service.get("entrypoint") or service.get("command")
    scripts = [
        Path(part).name for part in command if str(part).startswith("/opt/duosparse/services/")
    ]
    assert len(scripts) == 1, (
        f"{name}: the command must be one script of docker/services: {command}"
    )
    path = SERVICES / scripts[0]
    assert path.is_file(), path
    return path


# --- static checks --------------------------------------------------------------------------


def compose_schema() -> dict:
    vendor = importlib.resources.files("check_jsonschema.builtin_schemas.vendor")
    return json.loads((vendor / "compose-spec.json").read_text())


def test_compose_file_is_valid_against_the_compose_specification():
    schema = compose_schema()
    validator = jsonschema.Draft202012Validator(schema)
    tree = load_compose()
    errors = [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(tree)
    ]
    assert not errors, errors
    # and after interpolation with a filled-in env file, as compose sees it at `up`
    resolved = interpolate(tree, filled_env())
    errors = [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
        for e in validator.iter_errors(resolved)
    ]
    assert not errors, errors
    assert {"postgres", "object-store", "mlflow", "ray-head", "ray-worker"} <= set(tree["services"])
    # the worker is scalable: no fixed name, no host port
    worker = tree["services"]["ray-worker"]
    assert "container_name" not in worker and "ports" not in worker


def test_compose_publishes_only_on_loopback_and_has_no_working_default_secret():
    tree = load_compose()
    published = []
    for name, service in tree["services"].items():
        for port in service.get("ports", []):
            published.append(name)
            assert isinstance(port, str) and port.startswith("127.0.0.1:"), (name, port)
    assert set(published) == {"mlflow", "ray-head"}  # the MLflow UI and the Ray dashboard/job API
    # every secret of the template is required (${VAR:?...}) wherever compose uses it
    text = COMPOSE_FILE.read_text()
    for key in template_secrets():
        uses = re.findall(r"\$\{" + key + r"(:?[-?+]?)", text)
        if key == "MLFLOW_ADMIN_USERNAME":
            continue  # a user name, not a secret
        assert uses, f"{key} is in the template but compose does not use it"
        assert all(op == ":?" for op in uses), f"{key} must be ${{{key}:?...}} everywhere: {uses}"
        assert template_env()[key] == "", f"{key} has a value in the template"
    # the template alone (no secrets filled in) is refused
    with pytest.raises(KeyError, match="required variable"):
        interpolate(tree, template_env())
    # the real env file is never committed
    ignored = subprocess.run(["git", "check-ignore", "-q", "docker/.env"], cwd=ROOT)
    assert ignored.returncode == 0, "docker/.env must be listed in .gitignore"
    # Ray's token auth on every Ray service; MLflow behind basic auth with allowed hosts
    for name in ("ray-head", "ray-worker", "ray-worker-gpu"):
        env = service_env(tree, name)
        assert env["RAY_AUTH_MODE"] == "token" and env["RAY_AUTH_TOKEN"].startswith(
            "${RAY_AUTH_TOKEN:?"
        )
        assert env["MLFLOW_TRACKING_URI"].startswith("http://")
        assert env["DUOSPARSE_TUNE_STORAGE"] == "/shared/tune"
        mounts = tree["services"][name].get("volumes", [])
        assert "tune-storage:/shared/tune" in mounts, (
            f"{name}: Tune's storage must be the shared volume"
        )
    assert service_env(tree, "mlflow")["MLFLOW_ALLOWED_HOSTS"]
    assert "--app-name basic-auth" in (SERVICES / "mlflow-server.sh").read_text()


def test_make_env_writes_every_secret_fresh_and_private(tmp_path):
    out = tmp_path / ".env"
    subprocess.run(
        ["sh", str(DOCKER / "make-env.sh"), str(DOCKER / ".env.template"), str(out)],
        check=True,
        capture_output=True,
    )
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    env = dict(
        line.split("=", 1)
        for line in out.read_text().splitlines()
        if re.match(r"^[A-Z0-9_]+=", line)
    )
    values = [env[key] for key in template_secrets() if key != "MLFLOW_ADMIN_USERNAME"]
    assert all(len(v) >= 32 for v in values) and len(set(values)) == len(values)
    interpolate(load_compose(), env)  # nothing required is missing
    again = subprocess.run(
        ["sh", str(DOCKER / "make-env.sh"), str(DOCKER / ".env.template"), str(out)],
        capture_output=True,
        text=True,
    )
    assert again.returncode != 0 and "not overwriting" in again.stderr


def test_service_scripts_refuse_to_start_without_their_secrets(tmp_path):
    base = {"PATH": os.environ["PATH"], "HOME": str(tmp_path)}
    cases = {
        "ray-head.sh": ({}, "RAY_AUTH_TOKEN"),
        "ray-worker.sh": ({"RAY_AUTH_MODE": "token"}, "RAY_AUTH_TOKEN"),
        "mlflow-server.sh": (
            {
                "MLFLOW_BACKEND_STORE_URI": "postgresql://x",
                "MLFLOW_AUTH_DB_URI": "postgresql://y",
                "MLFLOW_ARTIFACTS_DESTINATION": "s3://b",
            },
            "MLFLOW_AUTH_ADMIN_PASSWORD",
        ),
        "object-store.sh": ({"OBJECT_STORE_IMPL": "minio"}, "AWS_ACCESS_KEY_ID"),
    }
    for script, (env, named) in cases.items():
        result = subprocess.run(
            ["sh", str(SERVICES / script)],
            env={**base, **env},
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert result.returncode != 0 and named in result.stderr, (script, result.stderr)
    # a head whose trials would log to a local SQLite file is refused
    result = subprocess.run(
        ["sh", str(SERVICES / "ray-head.sh")],
        capture_output=True,
        text=True,
        timeout=30,
        env={
            **base,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": "t",
            "MLFLOW_TRACKING_URI": "sqlite:///mlruns.db",
        },
    )
    assert result.returncode == 2 and "MLFLOW_TRACKING_URI" in result.stderr


def _makefile_install_line() -> str:
    lines = [
        line.strip()
        for line in (ROOT / "Makefile").read_text().splitlines()
        if "install" in line and "-c constraints.txt" in line
    ]
    assert len(lines) == 1, lines
    return lines[0]


def _run_lines(dockerfile: Path) -> list[str]:
    """The RUN instructions, continuation lines joined."""
    text = dockerfile.read_text().replace("\\\n", " ")
    return [line.strip()[4:] for line in text.splitlines() if line.strip().startswith("RUN ")]


def test_images_install_from_the_same_pinned_file_as_make_setup(tmp_path):
    _makefile_install_line()  # `make setup` installs with -c constraints.txt: the image runs it
    platform = (DOCKER / "Dockerfile.platform").read_text()
    runs = _run_lines(DOCKER / "Dockerfile.platform")
    assert "COPY --chown=duosparse:duosparse . /app" in platform  # constraints.txt and Makefile too
    setup = [r for r in runs if "make setup" in r]
    assert len(setup) == 1 and "pip install" not in " ".join(runs), (
        "the platform image installs via make setup"
    )
    assert "docker/torch-variant.sh" in setup[0]
    assert any("apt-get install" in r and " chromium" in r for r in runs), (
        "Debian's chromium for export"
    )
    assert "BROWSER_PATH=/usr/bin/chromium" in platform
    ignore = (DOCKER / "Dockerfile.platform.dockerignore").read_text().split()
    assert "docker/.env" in ignore and ".venv" in ignore
    # torch-variant.sh changes the torch line only, and only for cuda
    pins = (ROOT / "constraints.txt").read_text()
    for variant in ("cpu", "cuda"):
        copy = tmp_path / f"constraints-{variant}.txt"
        copy.write_text(pins)
        subprocess.run(["sh", str(DOCKER / "torch-variant.sh"), variant, str(copy)], check=True)
        changed = [
            (a, b) for a, b in zip(pins.splitlines(), copy.read_text().splitlines()) if a != b
        ]
        if variant == "cpu":
            assert not changed
        else:
            assert len(changed) == 1 and re.fullmatch(r"torch==[^+]+", changed[0][1]), changed
    # the MLflow image: pinned by the same file, and installs nothing the file does not pin
    runs = _run_lines(DOCKER / "Dockerfile.mlflow")
    pip = [r for r in runs if "pip install" in r]
    assert len(pip) == 1 and "-c /tmp/constraints.txt" in pip[0]
    assert "COPY constraints.txt /tmp/constraints.txt" in (DOCKER / "Dockerfile.mlflow").read_text()
    pinned = {
        re.split(r"[=<>\[]", line)[0].lower().replace("_", "-")
        for line in pins.splitlines()
        if line and not line.startswith("#")
    }
    command = next(part for part in pip[0].split("&&") if "pip install" in part)
    words = shlex.split(command)[2:]
    names = {
        re.sub(r"\[.*\]$", "", w).lower() for w in words if not w.startswith("-") and "/" not in w
    }
    assert {"mlflow", "psycopg", "boto3"} <= names <= pinned, (names, pinned)
    assert "mlflow[auth]" in pip[0] and "flask-wtf" in pinned  # basic auth's dependency, pinned


def test_kuberay_rayjob_uses_valid_rayjob_fields_with_auth_and_shared_storage():
    import ray

    schema = yaml.safe_load((ROOT / "tests" / "data" / "rayjob-v1.schema.yaml").read_text())
    job = yaml.safe_load(RAYJOB_FILE.read_text())
    errors = [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
        for e in jsonschema.Draft202012Validator(schema).iter_errors(job)
    ]
    assert not errors, errors
    spec = job["spec"]
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == ray.__version__  # the image's Ray, from constraints.txt
    # the entrypoint runs a sweep spec of this repository against the MLflow server in the env
    words = spec["entrypoint"].split()
    assert words[:3] == ["duosparse", "sweep", "run"]
    assert (ROOT / "sweeps" / Path(words[3]).name).is_file()
    pods = [
        ("submitter", spec["submitterPodTemplate"]["spec"]),
        ("head", cluster["headGroupSpec"]["template"]["spec"]),
    ]
    pods += [(g["groupName"], g["template"]["spec"]) for g in cluster["workerGroupSpecs"]]
    for name, pod in pods:
        volumes = {v["name"] for v in pod.get("volumes", [])}
        for container in pod["containers"]:
            env = {e["name"]: e for e in container.get("env", [])}
            assert len(env) == len(container.get("env", [])), f"{name}: duplicate env names"
            assert env["RAY_AUTH_MODE"]["value"] == "token", name
            assert "secretKeyRef" in env["RAY_AUTH_TOKEN"]["valueFrom"], (
                f"{name}: token from a Secret"
            )
            mounts = {m["name"]: m["mountPath"] for m in container.get("volumeMounts", [])}
            assert set(mounts) <= volumes, f"{name}: a mount without a volume"
            if name == "submitter":
                continue
            assert re.match(r"^https?://", env["MLFLOW_TRACKING_URI"]["value"]), name
            for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
                assert "secretKeyRef" in env[key]["valueFrom"], f"{name}: {key} from a Secret"
            storage = env["DUOSPARSE_TUNE_STORAGE"]["value"]
            shared = [
                path for m, path in mounts.items() if storage.startswith(path.rstrip("/") + "/")
            ]
            assert shared, f"{name}: Tune's storage {storage} is not on a mounted volume"
            claim = [
                v for v in pod["volumes"] if v["name"] in mounts and "persistentVolumeClaim" in v
            ]
            assert claim, f"{name}: the shared storage is a PersistentVolumeClaim"


# --- live: the service commands as processes in a private network namespace ------------------

# bring `lo` up in a fresh network namespace (SIOCGIFFLAGS / SIOCSIFFLAGS, IFF_UP)
LO_UP = """
import fcntl, socket, struct
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
flags = struct.unpack("16sH22x", fcntl.ioctl(s, 0x8913, struct.pack("16sH22x", b"lo", 0)))[1]
fcntl.ioctl(s, 0x8914, struct.pack("16sH22x", b"lo", flags | 1))
"""

# a byte relay: listen on one endpoint (tcp:HOST:PORT or unix:PATH), connect each client to another
RELAY = """
import socket, sys, threading
def endpoint(spec):
    kind, _, addr = spec.partition(":")
    if kind == "unix":
        return socket.AF_UNIX, addr
    host, _, port = addr.rpartition(":")
    return socket.AF_INET, (host, int(port))
def pump(a, b):
    try:
        while True:
            data = a.recv(65536)
            if not data:
                break
            b.sendall(data)
    except OSError:
        pass
    for s in (a, b):
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
family, address = endpoint(sys.argv[1])
target_family, target = endpoint(sys.argv[2])
server = socket.socket(family, socket.SOCK_STREAM)
if family == socket.AF_INET:
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(address)
server.listen(64)
print("ready", flush=True)
while True:
    client, _ = server.accept()
    upstream = socket.socket(target_family, socket.SOCK_STREAM)
    try:
        upstream.connect(target)
    except OSError:
        client.close()
        continue
    for a, b in ((client, upstream), (upstream, client)):
        threading.Thread(target=pump, args=(a, b), daemon=True).start()
"""


def _is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return bool((getattr(ip, "ipv4_mapped", None) or ip).is_loopback)


def _netns_id(pid: int | str) -> str:
    return os.readlink(f"/proc/{pid}/ns/net")


class Namespace:
    """A network namespace with only `lo`, held open by a sleeping process, and everything
    started in it (each in its own process group), for a complete teardown."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.procs: list[tuple[str, subprocess.Popen]] = []
        rootless = os.geteuid() != 0
        holder = (
            ["unshare", "--user", "--map-root-user", "--net"] if rootless else ["unshare", "--net"]
        )
        self.holder = subprocess.Popen(
            [*holder, "sleep", "infinity"], start_new_session=True, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.holder.poll() is not None:
                break
            with contextlib.suppress(OSError):
                if _netns_id(self.holder.pid) != _netns_id("self"):
                    break
            time.sleep(0.05)
        if self.holder.poll() is not None or _netns_id(self.holder.pid) == _netns_id("self"):
            err = self.holder.stderr.read().decode() if self.holder.poll() is not None else ""
            require(
                False,
                "cannot create a network namespace for the deployment test (run it as root, "
                f"as CI does, or enable unprivileged user namespaces): {err.strip()}",
            )
        self.id = _netns_id(self.holder.pid)
        pid = str(self.holder.pid)
        self.prefix = (
            ["nsenter", "--target", pid, "--user", "--net", "--preserve-credentials", "--"]
            if rootless
            else ["nsenter", f"--net=/proc/{pid}/ns/net", "--"]
        )
        subprocess.run([*self.prefix, sys.executable, "-c", LO_UP], check=True, timeout=30)

    def start(
        self, name: str, argv: list[str], env: dict[str, str], inside: bool = True
    ) -> subprocess.Popen:
        log = open(self.workdir / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(
            [*self.prefix, *argv] if inside else argv,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=self.workdir,
        )
        self.procs.append((name, proc))
        return proc

    def run(
        self, argv: list[str], env: dict[str, str], timeout: float, **kw
    ) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*self.prefix, *argv], env=env, capture_output=True, text=True, timeout=timeout, **kw
        )

    def python(self, code: str, env: dict[str, str], timeout: float = 120):
        """Run Python in the namespace; its last stdout line is JSON."""
        result = self.run([sys.executable, "-c", code], env=env, timeout=timeout)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
        return json.loads(result.stdout.strip().splitlines()[-1])

    def listening(self) -> list[tuple[str, int]]:
        """Every TCP socket listening in the namespace: (address, port)."""
        found = []
        for table, v6 in (("tcp", False), ("tcp6", True)):
            path = Path(f"/proc/{self.holder.pid}/net/{table}")
            if not path.exists():
                continue
            for line in path.read_text().splitlines()[1:]:
                fields = line.split()
                if fields[3] != "0A":  # LISTEN
                    continue
                hexaddr, hexport = fields[1].split(":")
                raw = bytes.fromhex(hexaddr)
                if v6:  # four little-endian 32-bit words
                    raw = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
                    addr = str(ipaddress.IPv6Address(raw))
                else:
                    addr = ".".join(str(b) for b in raw[::-1])
                found.append((addr, int(hexport, 16)))
        return found

    def members(self) -> list[psutil.Process]:
        """Every process in the namespace except its holder."""
        found = []
        for proc in psutil.process_iter():
            with contextlib.suppress(psutil.Error, OSError):
                if proc.pid != self.holder.pid and _netns_id(proc.pid) == self.id:
                    found.append(proc)
        return found

    def close(self) -> None:
        for _, proc in reversed(
            self.procs
        ):  # the main process first: `ray start --block` stops its node
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 45
        for _, proc in reversed(self.procs):
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        for _, proc in self.procs:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
        leftovers = self.members()  # e.g. Ray workers that left their process group
        for proc in leftovers:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        psutil.wait_procs(leftovers, timeout=10)
        self.holder.kill()
        self.holder.wait(timeout=10)


def _pg_parts(uri: str):
    parts = urlsplit(uri)
    return parts, parts.username, parts.password, parts.hostname or "127.0.0.1", parts.port or 5432


def _loopback(env: dict[str, str], names: dict[str, str]) -> dict[str, str]:
    """Point compose's service names at 127.0.0.1 and bind to loopback instead of 0.0.0.0."""
    out = {}
    for key, value in env.items():
        if value == "0.0.0.0":
            value = "127.0.0.1"
        for name in names:
            value = re.sub(rf"(?<=[/@,]){re.escape(name)}(?=:\d)", "127.0.0.1", value)
            value = re.sub(rf"^{re.escape(name)}(?=:\d)", "127.0.0.1", value)
        out[key] = value
    return out


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    uri = postgres_uri()
    for tool in ("unshare", "nsenter", "psql"):
        require(
            bool(shutil.which(tool)),
            f"the deployment test needs `{tool}` (util-linux / postgresql-client)",
        )
    import psycopg

    work = tmp_path_factory.mktemp("deployment")
    short = Path(tempfile.mkdtemp(prefix="dsdep-"))  # Ray's socket paths must stay short
    compose = load_compose()
    names = {name: name for name in compose["services"]}
    parts, pg_user, pg_password, pg_host, pg_port = _pg_parts(uri)
    suffix = secrets.token_hex(4)
    databases = {"mlflow": f"ds_deploy_{suffix}", "mlflow_auth": f"ds_deploy_auth_{suffix}"}
    env_file = filled_env(POSTGRES_PASSWORD=pg_password or "")
    base = {
        "PATH": f"{BIN}:{os.environ['PATH']}",
        "HOME": str(work),
        "LANG": "C.UTF-8",
        "PYTHONUNBUFFERED": "1",
    }
    if "DUOSPARSE_DATA_DIR" in os.environ:
        base["DUOSPARSE_DATA_DIR"] = os.environ["DUOSPARSE_DATA_DIR"]

    def env_for(service: str, **overrides: str) -> dict[str, str]:
        env = _loopback(interpolate(service_env(compose, service), env_file), names)
        unknown = set(overrides) - set(env) - {"RAY_TEMP_DIR", "RAY_START_ARGS"}
        assert not unknown, (
            f"the test overrides {unknown}, which compose does not set for {service}"
        )
        return {**base, **env, **overrides}

    def database_uri(compose_uri: str) -> str:
        cparts = urlsplit(compose_uri)
        netloc = f"{parts.username}:{parts.password}@127.0.0.1:5432"
        return urlunsplit(
            cparts._replace(netloc=netloc, path="/" + databases[cparts.path.lstrip("/")])
        )

    admin = psycopg.connect(uri, autocommit=True)
    ns = Namespace(work)
    try:
        # PostgreSQL: the test server's, as the compose service does it (tracking database, then
        # postgres-init.sh for the auth database), reached at 127.0.0.1:5432 inside the namespace
        admin.execute(f"CREATE DATABASE {databases['mlflow']}")
        pg_env = _loopback(interpolate(service_env(compose, "postgres"), env_file), names)
        subprocess.run(
            ["sh", str(SERVICES / "postgres-init.sh")],
            check=True,
            timeout=60,
            capture_output=True,
            env={
                **base,
                "POSTGRES_USER": pg_user,
                "POSTGRES_DB": databases[pg_env["POSTGRES_DB"]],
                "MLFLOW_AUTH_DB": databases[pg_env["MLFLOW_AUTH_DB"]],
                "PGHOST": pg_host,
                "PGPORT": str(pg_port),
                "PGPASSWORD": pg_password or "",
            },
        )
        sock = short / "pg.sock"
        ns.start(
            "pg-relay-host",
            [sys.executable, "-c", RELAY, f"unix:{sock}", f"tcp:{pg_host}:{pg_port}"],
            base,
            inside=False,
        )
        ns.start(
            "pg-relay", [sys.executable, "-c", RELAY, "tcp:127.0.0.1:5432", f"unix:{sock}"], base
        )

        # the object store (moto's S3 server standing in for MinIO), MLflow and the Ray head
        ns.start(
            "object-store",
            ["sh", str(service_script(compose, "object-store"))],
            env_for("object-store", OBJECT_STORE_IMPL="moto"),
        )
        mlflow_env = env_for("mlflow", MLFLOW_WORKERS="1")
        for key in ("MLFLOW_BACKEND_STORE_URI", "MLFLOW_AUTH_DB_URI"):
            mlflow_env[key] = database_uri(mlflow_env[key])
        ns.start("mlflow", ["sh", str(service_script(compose, "mlflow"))], mlflow_env)
        tune = work / "tune"  # compose: the tune-storage volume on every node
        head_env = env_for(
            "ray-head", DUOSPARSE_TUNE_STORAGE=str(tune), RAY_TEMP_DIR=str(short / "head")
        )
        ns.start("ray-head", ["sh", str(service_script(compose, "ray-head"))], head_env)
        ports = {int(head_env["RAY_GCS_PORT"]), int(head_env["RAY_DASHBOARD_PORT"])}
        _wait(lambda: ports <= {p for _, p in ns.listening()}, 120, "the Ray head", ns)
        worker_env = env_for(
            "ray-worker",
            DUOSPARSE_TUNE_STORAGE=str(tune),
            RAY_TEMP_DIR=str(short / "worker"),
            RAY_START_ARGS="--dashboard-agent-listen-port=52366",
        )
        ns.start("ray-worker", ["sh", str(service_script(compose, "ray-worker"))], worker_env)
        mlflow_url = head_env["MLFLOW_TRACKING_URI"]
        ns.python(WAIT_HTTP.replace("URL", f"{mlflow_url}/health"), base, timeout=180)
        yield {
            "ns": ns,
            "head_env": head_env,
            "mlflow_env": mlflow_env,
            "base": base,
            "work": work,
            "mlflow": mlflow_url,
            "dashboard": f"http://127.0.0.1:{head_env['RAY_DASHBOARD_PORT']}",
            "gcs": f"127.0.0.1:{head_env['RAY_GCS_PORT']}",
        }
    finally:
        ns.close()
        for db in databases.values():
            with contextlib.suppress(psycopg.Error):
                admin.execute(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
        admin.close()
        shutil.rmtree(short, ignore_errors=True)


WAIT_HTTP = """
import json, time, urllib.request
deadline = time.monotonic() + 170
while True:
    try:
        with urllib.request.urlopen("URL", timeout=3) as r:
            print(json.dumps(r.status)); break
    except OSError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.5)
"""


def _wait(predicate, timeout: float, what: str, ns: Namespace) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        for name, proc in ns.procs:
            if proc.poll() is not None:
                log = (ns.workdir / f"{name}.log").read_text()[-3000:]
                pytest.fail(f"{name} exited ({proc.returncode}) while waiting for {what}:\n{log}")
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not come up within {timeout} s")
        time.sleep(0.5)


PROBE = """
import base64, json, os, sys, urllib.error, urllib.request
url, dashboard = sys.argv[1], sys.argv[2]
user, password = os.environ["USER_NAME"], os.environ["USER_PASSWORD"]
def status(target, auth=None, host=None, token=None):
    request = urllib.request.Request(target)
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    if host:
        request.add_header("Host", host)
    if token:
        request.add_header("Authorization", "Bearer " + token)
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
api = url + "/api/2.0/mlflow/experiments/search?max_results=1"
print(json.dumps({
    "anonymous": status(api),
    "wrong_password": status(api, auth=f"{user}:not-the-password"),
    "admin": status(api, auth=f"{user}:{password}"),
    "foreign_host": status(api, auth=f"{user}:{password}", host="attacker.example"),
    "ui_anonymous": status(url + "/"),
    "ray_anonymous": status(dashboard + "/api/version"),
    "ray_wrong_token": status(dashboard + "/api/version", token="not-the-token"),
    "ray_token": status(dashboard + "/api/version", token=os.environ["RAY_AUTH_TOKEN"]),
}))
"""


@pytest.mark.slow
@pytest.mark.system
def test_mlflow_and_ray_refuse_unauthenticated_requests(stack):
    ns, mlflow_env, head_env = stack["ns"], stack["mlflow_env"], stack["head_env"]
    result = ns.run(
        [sys.executable, "-c", PROBE, stack["mlflow"], stack["dashboard"]],
        {
            **stack["base"],
            "USER_NAME": mlflow_env["MLFLOW_AUTH_ADMIN_USERNAME"],
            "USER_PASSWORD": mlflow_env["MLFLOW_AUTH_ADMIN_PASSWORD"],
            "RAY_AUTH_TOKEN": head_env["RAY_AUTH_TOKEN"],
        },
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    codes = json.loads(result.stdout.strip().splitlines()[-1])
    assert (
        codes["anonymous"] == 401
        and codes["wrong_password"] == 401
        and codes["ui_anonymous"] == 401
    ), codes
    assert codes["admin"] == 200, codes
    assert codes["foreign_host"] in (400, 403), codes  # --allowed-hosts, against DNS rebinding
    assert codes["ray_anonymous"] in (401, 403) and codes["ray_wrong_token"] in (401, 403), codes
    assert codes["ray_token"] == 200, codes


SWEEP_RESULT = """
import json, os, sys
from urllib.parse import urlparse
import boto3
from mlflow.tracking import MlflowClient
from duosparse import schema
client = MlflowClient(sys.argv[1])
exp = client.get_experiment_by_name("smoke")
runs = client.search_runs([exp.experiment_id])
trials = [r for r in runs if r.data.tags.get(schema.TAG_KIND) == "trial"]
listed = sorted(a.path for a in client.list_artifacts(trials[0].info.run_id)) if trials else []
dest = urlparse(os.environ["MLFLOW_ARTIFACTS_DESTINATION"])
s3 = boto3.client("s3", endpoint_url=os.environ["MLFLOW_S3_ENDPOINT_URL"])
keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=dest.netloc)
        for o in page.get("Contents", [])]
print(json.dumps({
    "artifact_location": exp.artifact_location,
    "trials": [{"status": r.info.status, "test_ppl": r.data.metrics.get(schema.TEST_PPL)} for r in trials],
    "listed": listed,
    "checkpoint": schema.ARTIFACT_CHECKPOINT,
    "keys": keys,
    "prefix": dest.path.strip("/"),
}))
"""

NODES = """
import json, sys, ray
ray.init(address=sys.argv[1], log_to_driver=False)
print(json.dumps([n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]]))
"""


@pytest.mark.slow
@pytest.mark.system
def test_smoke_sweep_via_ray_job_submit_lands_in_mlflow_and_the_object_store(stack):
    ns, head_env, mlflow_env = stack["ns"], stack["head_env"], stack["mlflow_env"]
    # the client holds only the cluster token: MLflow's URL and credentials come from the nodes
    client_env = {
        **stack["base"],
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": head_env["RAY_AUTH_TOKEN"],
    }
    deadline = time.monotonic() + 120
    while True:  # the worker node has joined
        nodes = ns.run([sys.executable, "-c", NODES, stack["gcs"]], client_env, timeout=120)
        assert nodes.returncode == 0, nodes.stderr[-3000:]
        addresses = json.loads(nodes.stdout.strip().splitlines()[-1])
        if len(addresses) == 2 or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert addresses == ["127.0.0.1", "127.0.0.1"], addresses
    # what `make cluster-submit SPEC=sweeps/smoke.yaml` runs on the head
    submit = ns.run(
        [
            str(BIN / "ray"),
            "job",
            "submit",
            "--address",
            stack["dashboard"],
            "--working-dir",
            str(ROOT),
            "--",
            "duosparse",
            "sweep",
            "run",
            "sweeps/smoke.yaml",
        ],
        client_env,
        timeout=900,
    )
    assert submit.returncode == 0, submit.stdout[-4000:] + submit.stderr[-3000:]
    assert "succeeded" in submit.stdout.lower()
    probe_env = {
        **stack["base"],
        "MLFLOW_TRACKING_USERNAME": head_env["MLFLOW_TRACKING_USERNAME"],
        "MLFLOW_TRACKING_PASSWORD": head_env["MLFLOW_TRACKING_PASSWORD"],
        **{
            k: mlflow_env[k]
            for k in (
                "MLFLOW_ARTIFACTS_DESTINATION",
                "MLFLOW_S3_ENDPOINT_URL",
                "AWS_ACCESS_KEY_ID",
                "AWS_SECRET_ACCESS_KEY",
            )
        },
    }
    found = ns.python(SWEEP_RESULT.replace("sys.argv[1]", repr(stack["mlflow"])), probe_env)
    assert len(found["trials"]) == SMOKE_TRIALS, found["trials"]
    assert all(t["status"] == "FINISHED" and t["test_ppl"] for t in found["trials"]), found[
        "trials"
    ]
    # artifacts went through the server (proxied) into the S3 bucket
    assert found["artifact_location"].startswith("mlflow-artifacts:"), found["artifact_location"]
    assert found["checkpoint"] in found["listed"], found["listed"]
    stored = [k for k in found["keys"] if k.endswith("/" + found["checkpoint"])]
    assert len(stored) >= SMOKE_TRIALS and all(
        k.startswith(found["prefix"] + "/") for k in stored
    ), found["keys"]


@pytest.mark.slow
@pytest.mark.system
def test_nothing_listens_beyond_loopback(stack):
    ns = stack["ns"]
    listening = ns.listening()
    ports = {port for _, port in listening}
    head = stack["head_env"]
    expected = {
        5432,
        int(stack["mlflow_env"]["MLFLOW_PORT"]),
        9000,
        int(head["RAY_GCS_PORT"]),
        int(head["RAY_DASHBOARD_PORT"]),
    }
    assert expected <= ports, (expected, sorted(listening))  # the services did run in here
    beyond = [(addr, port) for addr, port in listening if not _is_loopback(addr)]
    assert not beyond, f"listening beyond loopback: {beyond}"
    # ... and each service's own processes (psutil reads their namespace's tables) agree
    members = ns.members()
    assert len(members) > 10  # the Ray nodes' processes, MLflow, the object store, the relay
    for proc in members:
        with contextlib.suppress(psutil.Error):
            for conn in proc.net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN:
                    assert _is_loopback(conn.laddr.ip), (proc.name(), conn.laddr)
    # outside the namespace the test started only the relay's host end, on a Unix socket
    outside = [p for _, p in ns.procs if _netns_id(p.pid) != ns.id]
    assert len(outside) == 1
    assert not [
        c
        for c in psutil.Process(outside[0].pid).net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN
    ]
