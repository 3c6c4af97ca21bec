"""Static checks of the container image and the single-host compose file (no Docker engine needed).

deploy/Dockerfile is read by a small parser of its instructions; deploy/compose.yaml with PyYAML,
its `${VAR:-default}` interpolations resolved to their defaults (what `docker compose up` uses with
no .env). Every command a container runs must name a real entry point of this repository (a module
with a `__main__` guard, the uvicorn app factory, a console script) or `ray` / `redis-server`; every
environment variable our services get must be a real setting (service/settings.py), one the image
defines, or one of Ray's.
"""

from __future__ import annotations

import ast
import fnmatch
import http.server
import importlib
import json
import re
import shlex
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
COMPOSE = DEPLOY / "compose.yaml"

OUR_SERVICES = {"ray-head", "api", "dispatcher"}          # built from deploy/Dockerfile
# Ray's own variables our services may set (token authentication, usage statistics).
RAY_VARIABLES = {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_USAGE_STATS_ENABLED"}
BUILD_TOOLS = {"gcc", "g++", "build-essential", "make", "clang", "cmake", "cpp"}


# -- the Dockerfile ------------------------------------------------------------------------------
@dataclass
class Instruction:
    keyword: str
    args: str
    line: int


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [ins for ins in self.instructions if ins.keyword == keyword]


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions with their line continuations joined; comment lines (also those inside a
    continuation, as Docker allows) and blank lines dropped. Parser directives are comments here."""
    instructions: list[Instruction] = []
    pending, start = "", 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending += stripped[:-1].rstrip() + " "
            continue
        logical = (pending + stripped).strip()
        pending = ""
        keyword, _, args = logical.partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip(), start))
    assert not pending, "the Dockerfile ends inside a line continuation"
    return instructions


def split_stages(instructions: list[Instruction]) -> tuple[dict[str, str], list[Stage]]:
    """(global ARG defaults, stages)."""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for ins in instructions:
        if ins.keyword == "FROM":
            words = ins.args.split()
            words = [w for w in words if not w.startswith("--")]   # --platform=...
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append(Stage(words[0], name))
        elif not stages:
            assert ins.keyword == "ARG", f"line {ins.line}: only ARG may come before the first FROM"
            key, _, default = ins.args.partition("=")
            global_args[key.strip()] = default.strip().strip('"')
        else:
            stages[-1].instructions.append(ins)
    return global_args, stages


def substitute(text: str, variables: dict[str, str]) -> str:
    def value(match: re.Match) -> str:
        name = match.group(1) or match.group(2)
        assert name in variables, f"${name} is not defined (ARG or ENV) where it is used"
        return variables[name]
    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$([A-Za-z_][A-Za-z0-9_]*)", value, text)


def stage_variables(stage: Stage, global_args: dict[str, str]) -> dict[str, str]:
    """ARG defaults and ENV values visible at the end of a stage (a global ARG only when the
    stage declares it again, as in Docker)."""
    variables: dict[str, str] = {}
    for ins in stage.instructions:
        if ins.keyword == "ARG":
            key, sep, default = ins.args.partition("=")
            key = key.strip()
            variables[key] = default.strip().strip('"') if sep else global_args.get(key, "")
        elif ins.keyword == "ENV":
            variables.update(key_values(ins.args))
    return variables


def key_values(args: str) -> dict[str, str]:
    """`KEY=VALUE KEY2="VALUE 2"` (LABEL, ENV) into a dict."""
    pairs = {}
    for word in shlex.split(args):
        key, sep, value = word.partition("=")
        assert sep, f"expected KEY=VALUE, got {word!r}"
        pairs[key] = value
    return pairs


def command_words(args: str) -> list[str]:
    """Exec form (a JSON array) or shell form."""
    if args.lstrip().startswith("["):
        return json.loads(args)
    return shlex.split(args)


@pytest.fixture(scope="module")
def dockerfile():
    global_args, stages = split_stages(parse_dockerfile(DOCKERFILE.read_text()))
    return global_args, stages


def test_dockerfile_parser_joins_continuations_and_drops_comments():
    text = 'FROM a AS b\n# note\nRUN one \\\n    # inside\n    two \\\n\n    three\nCMD ["x"]\n'
    got = [(i.keyword, i.args, i.line) for i in parse_dockerfile(text)]
    assert got == [("FROM", "a AS b", 1), ("RUN", "one two three", 3), ("CMD", '["x"]', 8)]


def test_multi_stage_from_a_cuda_pytorch_base(dockerfile):
    global_args, stages = dockerfile
    assert len(stages) >= 2, "expected a builder stage and a runtime stage"
    assert stages[0].name == "builder"
    for stage in stages:
        base = substitute(stage.base, global_args)
        match = re.fullmatch(r"pytorch/pytorch:(\d+)\.(\d+)\.(\d+)-cuda(\d+)\.(\d+)-cudnn\d+-(runtime|devel)", base)
        assert match, f"stage {stage.name}: base {base!r} is not a CUDA build of pytorch/pytorch"
        torch_version = tuple(map(int, match.group(1, 2)))
        assert torch_version >= required_torch(), f"{base}: pyproject requires torch >= {required_torch()}"
        assert int(match.group(4)) >= 12
    final_base = substitute(stages[-1].base, global_args)
    assert final_base.endswith("-runtime"), "the final stage runs on the runtime base, not devel"


def required_torch() -> tuple[int, int]:
    for requirement in pyproject()["project"]["dependencies"]:
        match = re.fullmatch(r"torch>=(\d+)\.(\d+)", requirement.replace(" ", ""))
        if match:
            return int(match.group(1)), int(match.group(2))
    raise AssertionError("pyproject lists no torch>=X.Y")


def pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_builder_builds_the_project_wheel_from_what_it_copies(dockerfile):
    _, stages = dockerfile
    builder = stages[0]
    runs = " ".join(ins.args for ins in builder.all("RUN"))
    assert re.search(r"pip wheel\b.*--no-deps", runs), "the builder makes the wheel with `pip wheel --no-deps .`"
    copied = set()
    for ins in builder.all("COPY"):
        words = [w for w in shlex.split(ins.args) if not w.startswith("--")]
        copied.update(Path(source).as_posix().rstrip("/") for source in words[:-1])
    project = pyproject()
    needed = {"pyproject.toml", project["project"]["readme"]}
    needed |= {pattern.rstrip("*").rstrip(".") for pattern in project["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert needed <= copied, f"the builder does not copy {sorted(needed - copied)} (packages or files the wheel is built from)"
    ignored = [path for path in copied if dockerignored(path)]
    assert not ignored, f".dockerignore excludes {ignored}, which the builder copies"
    for path in copied:
        assert (ROOT / path).exists(), f"the builder copies {path}, which does not exist"


def test_final_stage_installs_the_wheel_without_caches_or_build_tools(dockerfile):
    _, stages = dockerfile
    final = stages[-1]
    copies = [ins.args for ins in final.all("COPY")]
    assert any(re.search(r"--from=builder\b", args) for args in copies), "the final stage copies the wheel with COPY --from=builder"
    pip_installs = [ins for ins in final.all("RUN") if re.search(r"\bpip3? install\b", ins.args)]
    assert pip_installs, "the final stage installs the wheel with pip"
    for ins in pip_installs:
        for command in re.findall(r"pip3? install[^;&|]*", ins.args):
            assert "--no-cache-dir" in command, f"line {ins.line}: `{command.strip()}` without --no-cache-dir"
    for ins in final.all("RUN"):
        for command in re.findall(r"apt-get\s+install[^;&|]*", ins.args):
            tools = BUILD_TOOLS & set(command.split())
            assert not tools, f"line {ins.line}: the final stage installs build tools {sorted(tools)}"
        if "apt-get" in ins.args:
            assert "rm -rf /var/lib/apt/lists" in ins.args, f"line {ins.line}: apt lists left in the layer"


def test_final_stage_runs_as_a_fixed_non_root_user(dockerfile):
    global_args, stages = dockerfile
    final = stages[-1]
    variables = stage_variables(final, global_args)
    users = final.all("USER")
    assert users, "the final stage sets no USER: every role would run as root"
    user = substitute(users[-1].args, variables).split(":")[0]
    assert user not in ("", "0", "root"), f"USER {user!r} is root"
    assert user.isdigit(), "a numeric UID, so that Kubernetes' runAsNonRoot can verify it"
    assert final.all("WORKDIR")
    env = {}
    for ins in final.all("ENV"):
        env.update(key_values(ins.args))
    assert env.get("PYTHONUNBUFFERED") == "1"
    assert env.get("HOME", "").startswith("/home/"), "HOME of the non-root user"


def test_oci_labels(dockerfile):
    global_args, stages = dockerfile
    final = stages[-1]
    variables = stage_variables(final, global_args)
    labels = {}
    for ins in final.all("LABEL"):
        labels.update(key_values(ins.args))
    for key in ("title", "description", "source", "licenses", "version"):
        assert f"org.opencontainers.image.{key}" in labels, f"LABEL org.opencontainers.image.{key} missing"
    assert labels["org.opencontainers.image.licenses"] == pyproject()["project"]["license"]["text"] == "Apache-2.0"
    version = re.search(r'__version__ = "([^"]+)"', (ROOT / "scdd" / "__init__.py").read_text()).group(1)
    assert substitute(labels["org.opencontainers.image.version"], variables) == version, \
        "ARG VERSION of the Dockerfile differs from scdd.__version__"


def test_exposed_ports_are_the_roles_ports(dockerfile):
    _, stages = dockerfile
    exposed = {int(port.split("/")[0]) for ins in stages[-1].all("EXPOSE") for port in ins.args.split()}
    assert exposed == {8000, 8265, 6379}


def test_default_cmd_starts_the_api(dockerfile):
    _, stages = dockerfile
    final = stages[-1]
    assert not final.all("ENTRYPOINT"), "no ENTRYPOINT: compose and Kubernetes give each role its command"
    cmd = command_words(final.all("CMD")[-1].args)
    check_command(cmd)
    assert cmd[:3] == ["uvicorn", "--factory", "service.api.main:create_app"]
    assert option(cmd, "--host") == "0.0.0.0" and option(cmd, "--port") == "8000"


def healthcheck_code(stages: list[Stage]) -> str:
    checks = stages[-1].all("HEALTHCHECK")
    assert checks, "the final stage has no HEALTHCHECK"
    args = checks[-1].args
    assert not args.upper().startswith("NONE")
    words = args.split(" CMD ", 1)
    assert len(words) == 2, "HEALTHCHECK [options] CMD ..."
    command = command_words(words[1])
    assert command[:2] == ["python", "-c"], "the check uses Python (the base has no curl)"
    return command[2]


class _Healthz(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/healthz" else 404)
        self.end_headers()
        self.wfile.write(b'{"status":"ok"}')

    def log_message(self, *args):
        pass


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_healthcheck_hits_healthz_and_passes_for_other_roles(dockerfile, tmp_path):
    _, stages = dockerfile
    code = healthcheck_code(stages)
    assert "http://127.0.0.1:8000/healthz" in code and "SCDD_ROLE" in code

    def run(role: str, port: int) -> int:
        probe = code.replace("127.0.0.1:8000", f"127.0.0.1:{port}")
        env = {"PATH": "/usr/bin:/bin", "SCDD_ROLE": role}
        return subprocess.run([sys.executable, "-c", probe], env=env, cwd=tmp_path, timeout=30,
                              capture_output=True, check=False).returncode

    nothing_there = free_port()
    assert run("dispatcher", nothing_there) == 0, "a non-API role must pass the image's check"
    assert run("ray-head", nothing_there) == 0
    assert run("api", nothing_there) != 0, "the API role fails when nothing answers /healthz"
    server = http.server.HTTPServer(("127.0.0.1", 0), _Healthz)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        assert run("api", server.server_address[1]) == 0
    finally:
        server.shutdown()
        server.server_close()
    from service.api.main import create_app
    from service.settings import Settings

    app = create_app(Settings(api_keys=None, api_keys_file=None))
    assert "get" in app.openapi()["paths"].get("/healthz", {}), "the API has no GET /healthz"


def test_image_environment_is_settings_or_documented(dockerfile):
    _, stages = dockerfile
    env = {}
    for ins in stages[-1].all("ENV"):
        env.update(key_values(ins.args))
    ours = {name for name in env if name.startswith("SCDD_")}
    assert ours - settings_env_names() == {"SCDD_ROLE"}, "SCDD_* variables of the image that are no settings"
    assert env["SCDD_ROLE"] == "api", "the default CMD is the API, so is the default role"
    assert env["SCDD_DATA_ROOTS"] == "/usr/share/datasets"


# -- .dockerignore -------------------------------------------------------------------------------
def dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def dockerignored(path: str) -> bool:
    """Whether a path (relative to the context) or one of its parents matches a pattern
    (no `!` exceptions are used)."""
    parts = Path(path).parts
    candidates = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    for pattern in dockerignore_patterns():
        assert not pattern.startswith("!"), "the check does not handle exceptions"
        pattern = pattern.strip("/")
        for candidate in candidates:
            if fnmatch.fnmatch(candidate, pattern):
                return True
            if pattern.startswith("**/") and (fnmatch.fnmatch(candidate, pattern[3:])
                                              or fnmatch.fnmatch(candidate, "*/" + pattern[3:])):
                return True
    return False


def test_dockerignore_keeps_vcs_caches_outputs_and_secrets_out():
    for path in (".git", ".git/config", "scdd/__pycache__/cli.cpython-311.pyc", "scdd.egg-info",
                 ".pytest_cache", ".ruff_cache", "runs/demo", "scdd-service/api-key", "bench/out/x.json",
                 "deploy/secrets/ray_auth_token", "deploy/.env", ".venv"):
        assert dockerignored(path), f".dockerignore lets {path} into the build context"
    for path in ("pyproject.toml", "README.md", "scdd/cli.py", "service/api/main.py", "deploy/Dockerfile"):
        assert not dockerignored(path), f".dockerignore excludes {path}"


def test_deploy_secrets_are_git_ignored():
    ignored = (DEPLOY / ".gitignore").read_text().split()
    assert "secrets/" in ignored and ".env" in ignored


# -- compose.yaml --------------------------------------------------------------------------------
INTERPOLATION = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])((?:[^{}]|\{[^{}]*\})*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)")


def interpolate(value, env: dict[str, str] | None = None):
    """Compose's interpolation with an empty environment (or `env`): `${VAR:-default}` gives the
    default, `${VAR}` an empty string, `$$` a literal `$`."""
    env = env or {}
    if isinstance(value, dict):
        return {key: interpolate(item, env) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, env) for item in value]
    if not isinstance(value, str):
        return value

    def one(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1) or match.group(4)
        operator, argument = match.group(2), match.group(3) or ""
        current = env.get(name)
        if operator in (":-", "-"):
            unset = current is None or (operator == ":-" and current == "")
            return interpolate(argument, env) if unset else current
        if operator in (":?", "?"):
            raise AssertionError(f"${{{name}}} is required: {argument}")
        if operator in (":+", "+"):
            return interpolate(argument, env) if current else ""
        return current or ""
    return INTERPOLATION.sub(one, value)


@pytest.fixture(scope="module")
def compose() -> dict:
    raw = yaml.safe_load(COMPOSE.read_text())
    return interpolate(raw)


def environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {key: "" if value is None else str(value) for key, value in env.items()}


@dataclass
class Mount:
    source: str
    target: str
    read_only: bool
    kind: str          # volume | bind | tmpfs


def mounts(service: dict) -> list[Mount]:
    found = []
    for item in service.get("volumes", []):
        if isinstance(item, dict):
            kind = item["type"]
            found.append(Mount(item.get("source", ""), item["target"], bool(item.get("read_only")), kind))
            continue
        parts = item.split(":")
        source, target = parts[0], parts[1]
        options = parts[2].split(",") if len(parts) > 2 else []
        kind = "bind" if source.startswith(("/", ".", "~")) else "volume"
        found.append(Mount(source, target, "ro" in options, kind))
    return found


def mount_at(service: dict, target: str) -> Mount | None:
    return next((m for m in mounts(service) if m.target.rstrip("/") == target.rstrip("/")), None)


@dataclass
class Published:
    host_ip: str
    host_port: str
    container_port: int


def published(service: dict) -> list[Published]:
    found = []
    for item in service.get("ports", []):
        if isinstance(item, dict):
            found.append(Published(item.get("host_ip", ""), str(item.get("published", "")), int(item["target"])))
            continue
        parts = str(item).split("/")[0].split(":")
        container = int(parts[-1])
        host_port = parts[-2] if len(parts) >= 2 else ""
        host_ip = ":".join(parts[:-2]) if len(parts) >= 3 else ""
        found.append(Published(host_ip, host_port, container))
    return found


def option(words: list[str], flag: str) -> str | None:
    """The value of `--flag value` or `--flag=value`."""
    for index, word in enumerate(words):
        if word == flag and index + 1 < len(words):
            return words[index + 1]
        if word.startswith(flag + "="):
            return word.split("=", 1)[1]
    return None


def service_command(name: str, service: dict, default_cmd: list[str]) -> list[str]:
    assert "entrypoint" not in service, f"{name}: the image has no ENTRYPOINT; give the role as command"
    command = service.get("command")
    if command is None:
        assert name in OUR_SERVICES, f"{name}: no command"
        return default_cmd
    return command_words(command) if isinstance(command, str) else [str(word) for word in command]


def check_command(words: list[str]) -> None:
    """The command names something real: a console script, a module of this repository with a
    `__main__` guard, the uvicorn app factory, `ray start` or `redis-server`."""
    program = Path(words[0]).name
    if program == "ray":
        assert words[1] == "start", f"`ray {words[1]}`: the Ray roles run `ray start`"
    elif program == "redis-server":
        pass
    elif program in ("python", "python3"):
        assert words[1] == "-m", f"{words}: run a module with python -m"
        check_main_module(words[2])
    elif program == "uvicorn":
        target = next(word for word in words[1:] if not word.startswith("-") and ":" in word)
        module_name, _, attribute = target.partition(":")
        assert_in_wheel(module_name)
        module = importlib.import_module(module_name)
        assert callable(getattr(module, attribute, None)), f"{module_name} defines no {attribute}"
        if "--factory" not in words:
            raise AssertionError(f"{target} is a factory (create_app(settings)): uvicorn needs --factory")
    else:
        scripts = pyproject()["project"].get("scripts", {})
        assert program in scripts, f"{program!r} is neither a console script of the project ({sorted(scripts)}) " \
                                   "nor ray, redis-server, python -m or uvicorn"


def assert_in_wheel(module_name: str) -> None:
    packages = [p.rstrip("*").rstrip(".") for p in pyproject()["tool"]["setuptools"]["packages"]["find"]["include"]]
    assert module_name.split(".")[0] in packages, f"{module_name} is not in the wheel (packages.find: {packages})"


def check_main_module(module_name: str) -> None:
    assert_in_wheel(module_name)
    path = ROOT.joinpath(*module_name.split("."))
    file = path / "__main__.py" if path.is_dir() else path.with_suffix(".py")
    assert file.exists(), f"python -m {module_name}: no {file.relative_to(ROOT)}"
    if file.name == "__main__.py":
        return
    tree = ast.parse(file.read_text())
    guards = [node for node in tree.body if isinstance(node, ast.If) and "__name__" in ast.unparse(node.test)
              and "__main__" in ast.unparse(node.test)]
    assert guards, f"{file.relative_to(ROOT)} has no `if __name__ == \"__main__\":`, so python -m runs nothing"


def settings_env_names() -> set[str]:
    from pydantic import AliasChoices

    from service.settings import Settings

    prefix = Settings.model_config.get("env_prefix", "")
    names = set()
    for name, info in Settings.model_fields.items():
        alias = info.validation_alias
        if isinstance(alias, AliasChoices):
            names.update(str(choice).upper() for choice in alias.choices)
        elif isinstance(alias, str):
            names.add(alias.upper())
        else:
            names.add(f"{prefix}{name}".upper())
    return names


@pytest.fixture(scope="module")
def default_cmd(dockerfile) -> list[str]:
    _, stages = dockerfile
    return command_words(stages[-1].all("CMD")[-1].args)


def test_the_expected_services(compose):
    assert set(compose["services"]) == {"redis", "ray-head", "api", "dispatcher"}
    for name, service in compose["services"].items():
        assert service.get("restart") == "unless-stopped", f"{name}: restart: unless-stopped"
    redis = " ".join(compose["services"]["redis"]["command"])
    assert "--appendonly yes --appendfsync always" in redis  # a restart loses no job
    assert "--maxmemory-policy noeviction" in redis and "--maxmemory 1gb" in redis  # full: refuse, never evict


def test_our_services_run_the_image_of_deploy_dockerfile(compose):
    images = set()
    for name in OUR_SERVICES:
        service = compose["services"][name]
        images.add(service["image"])
        build = service.get("build")
        assert build, f"{name}: no build section"
        context = (COMPOSE.parent / build["context"]).resolve()
        assert context == ROOT, f"{name}: the build context must be the repository root"
        assert (context / build["dockerfile"]).resolve() == DOCKERFILE
    assert len(images) == 1, f"one image for every role, got {images}"


def test_every_command_names_a_real_entry_point(compose, default_cmd):
    for name, service in compose["services"].items():
        check_command(service_command(name, service, default_cmd))
    api = compose["services"]["api"]
    assert service_command("api", api, default_cmd)[:3] == ["uvicorn", "--factory", "service.api.main:create_app"]
    assert service_command("dispatcher", compose["services"]["dispatcher"], default_cmd) == \
        ["python", "-m", "service.dispatcher"]
    # and the entrypoint the dispatcher submits to Ray, which runs in the Ray head's container
    submitted = re.findall(r"-m (service\.[a-z_.]+)", (ROOT / "service" / "dispatcher.py").read_text())
    assert submitted
    for module_name in submitted:
        check_main_module(module_name)


def test_redis_is_durable(compose):
    redis = compose["services"]["redis"]
    assert redis["image"].split(":")[0] == "redis" and redis["image"].split(":")[1].startswith("7")
    command = service_command("redis", redis, [])
    assert command[0] == "redis-server"
    assert option(command, "--appendonly") == "yes" and option(command, "--appendfsync") == "always"
    data = mount_at(redis, "/data")
    assert data and data.kind == "volume" and data.source in compose["volumes"], "Redis data on a named volume"
    assert "redis-cli" in redis["healthcheck"]["test"] and "ping" in redis["healthcheck"]["test"]
    assert not published(redis), "Redis has no password: it must not be published"


def test_the_gpus_go_to_the_ray_node(compose):
    def gpu_devices(service: dict) -> list[dict]:
        devices = (((service.get("deploy") or {}).get("resources") or {}).get("reservations") or {}).get("devices") or []
        return [d for d in devices if "gpu" in d.get("capabilities", [])]

    head = compose["services"]["ray-head"]
    devices = gpu_devices(head)
    assert len(devices) == 1 and devices[0]["driver"] == "nvidia" and str(devices[0]["count"]) == "all"
    for name in ("api", "dispatcher", "redis"):
        assert not gpu_devices(compose["services"][name]), f"{name} reserves GPUs it does not use"
    command = service_command("ray-head", head, [])
    assert command[:2] == ["ray", "start"] and "--head" in command and "--block" in command
    assert option(command, "--dashboard-host") == "0.0.0.0", "the API and dispatcher reach the Jobs API over the network"
    assert option(command, "--port") == "6379"
    assert int(option(command, "--num-gpus")) >= 1
    assert head.get("shm_size"), "Ray's object store needs a large /dev/shm"
    assert re.fullmatch(r"\d+[gG][bB]?", str(head["shm_size"])), "shm_size in gigabytes"


def test_published_ports(compose):
    services = compose["services"]
    api_ports = published(services["api"])
    assert [(p.host_ip, p.container_port) for p in api_ports] == [("127.0.0.1", 8000)], \
        "the API is published on loopback by default"
    for name, service in services.items():
        for port in published(service):
            assert port.host_ip == "127.0.0.1", f"{name} publishes {port.container_port} beyond loopback by default"
            assert port.container_port != 6379, f"{name} publishes a Redis/GCS port"


def test_service_addresses_point_at_the_services(compose):
    services = compose["services"]
    head_command = service_command("ray-head", services["ray-head"], [])
    for name in ("api", "dispatcher"):
        env = environment(services[name])
        redis_url = urlparse(env["REDIS_URL"])
        assert redis_url.scheme == "redis" and redis_url.hostname == "redis" and (redis_url.port or 6379) == 6379
        ray = urlparse(env["RAY_ADDRESS"])
        assert ray.scheme == "http" and ray.hostname == "ray-head", "RAY_ADDRESS is the Jobs API of the ray-head service"
        assert ray.port == int(option(head_command, "--dashboard-port")), "RAY_ADDRESS must use the dashboard port"
    depends = services["api"]["depends_on"]
    assert depends["redis"]["condition"] == "service_healthy" and "ray-head" in depends
    assert services["dispatcher"]["depends_on"]["redis"]["condition"] == "service_healthy"


def test_environment_names_are_real_settings(compose, dockerfile):
    _, stages = dockerfile
    image_env = {}
    for ins in stages[-1].all("ENV"):
        image_env.update(key_values(ins.args))
    settings = settings_env_names()
    for name in OUR_SERVICES:
        for variable in environment(compose["services"][name]):
            if variable in settings or variable in RAY_VARIABLES:
                continue
            assert variable in image_env, f"{name}: {variable} is no setting of service/settings.py, no variable of " \
                                          "the image and none of Ray's"
        # the image's HEALTHCHECK probes the API only where SCDD_ROLE is api
        assert environment(compose["services"][name]).get("SCDD_ROLE") == name, f"{name}: SCDD_ROLE={name}"


def test_artifacts_and_datasets_are_shared_correctly(compose):
    services = compose["services"]
    api_env = environment(services["api"])
    artifacts = api_env["SCDD_ARTIFACTS"]
    assert environment(services["dispatcher"])["SCDD_ARTIFACTS"] == artifacts
    head_mount, api_mount = mount_at(services["ray-head"], artifacts), mount_at(services["api"], artifacts)
    assert head_mount and not head_mount.read_only, "jobs run in the Ray head and write their artifacts there"
    assert api_mount and api_mount.read_only, "the API only reads artifacts"
    assert head_mount.kind == api_mount.kind == "volume" and head_mount.source == api_mount.source
    assert head_mount.source in compose["volumes"]
    for root in api_env["SCDD_DATA_ROOTS"].split(":"):
        for name in ("ray-head", "api"):
            data = mount_at(services[name], root)
            assert data and data.read_only, f"{name}: mount the datasets read-only at {root}"


def test_read_only_roots_with_a_tmpfs(compose):
    for name in ("api", "dispatcher", "redis"):
        service = compose["services"][name]
        assert service.get("read_only") is True, f"{name}: read_only root filesystem"
        tmpfs = service.get("tmpfs") or []
        assert "/tmp" in ([tmpfs] if isinstance(tmpfs, str) else tmpfs), f"{name}: a tmpfs at /tmp"


def test_ray_token_authentication_is_consistent(compose):
    services, secrets = compose["services"], compose.get("secrets", {})
    head = environment(services["ray-head"])
    dispatcher = environment(services["dispatcher"])
    mode = head.get("RAY_AUTH_MODE")
    assert mode in ("token", "disabled"), "decide Ray's authentication explicitly (Ray >= 2.5x defaults to token)"
    assert dispatcher.get("RAY_AUTH_MODE") == mode, "the dispatcher talks to the Jobs API with the head's mode"
    if mode == "disabled":
        return
    for name, env in (("ray-head", head), ("dispatcher", dispatcher)):
        path = env.get("RAY_AUTH_TOKEN_PATH")
        assert path, f"{name}: RAY_AUTH_TOKEN_PATH (a secret file; a token in the environment leaks via inspect)"
        secret = Path(path).name
        assert path == f"/run/secrets/{secret}" and secret in secrets and "file" in secrets[secret]
        granted = [s if isinstance(s, str) else s["source"] for s in services[name].get("secrets", [])]
        assert secret in granted, f"{name} is not given the secret {secret}"
    assert head["RAY_AUTH_TOKEN_PATH"] == dispatcher["RAY_AUTH_TOKEN_PATH"]
    assert (DEPLOY / secrets[Path(head["RAY_AUTH_TOKEN_PATH"]).name]["file"]).resolve().is_relative_to(DEPLOY / "secrets")


def test_api_keys_come_from_a_secret_file_or_the_environment(compose):
    api = compose["services"]["api"]
    env = environment(api)
    assert "SCDD_API_KEYS_FILE" in env or "SCDD_API_KEYS" in env
    if "SCDD_API_KEYS_FILE" in env:
        secret = Path(env["SCDD_API_KEYS_FILE"]).name
        granted = [s if isinstance(s, str) else s["source"] for s in api.get("secrets", [])]
        assert secret in granted and secret in compose["secrets"]


def test_ray_head_health_check_uses_a_public_endpoint(compose):
    head = compose["services"]["ray-head"]
    test = " ".join(head["healthcheck"]["test"])
    port = option(service_command("ray-head", head, []), "--dashboard-port")
    assert f"127.0.0.1:{port}/api/gcs_healthz" in test, "gcs_healthz answers without the Ray token"


def test_interpolation_defaults():
    assert interpolate("${A:-x}:${B-y}:${C}:$$D") == "x:y::$D"
    assert interpolate("${A:-x}", {"A": "set"}) == "set"
    assert interpolate("${A:-${B:-z}}") == "z"


def test_the_image_installs_the_cuda_lock_with_hashes_and_copies_only_what_exists(dockerfile):
    _, stages = dockerfile
    for stage in stages:
        for ins in stage.all("COPY"):
            words = [w for w in ins.args.split() if not w.startswith("--")]
            if any(w.startswith("--from") for w in ins.args.split()):
                continue
            for source in words[:-1]:
                assert (ROOT / source).exists(), f"COPY {source}: no such file in the repository"
                assert not dockerignored(source), f"COPY {source}: .dockerignore keeps it out of the build context"
    install = " ".join(ins.args for ins in stages[-1].all("RUN") if "pip install" in ins.args)
    assert "--require-hashes --no-deps -r /tmp/lock/cuda.lock" in install
    assert "/tmp/wheels/scdd-*.whl" in install and "-c /tmp" not in install  # nothing resolved at build time
