"""The deployment files (deploy/, docs/deploy.md) against the real `pool` CLI, without Docker,
Kubernetes or systemd: the manifests parse, every `pool` command they run is a real
subcommand given real flags, the probe and health-check commands map `pool health`'s exit
status (0 healthy, 1 degraded, 2 failed) as docs/deploy.md says, and every stop timeout
covers the pool's own drain."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest
import yaml  # a dependency of transformers, so always in the project's environment

from pool import config
from pool.config import DEFAULT_SHUTDOWN_DRAIN_S as SHUTDOWN_DRAIN_S
from pool.health import VersionFacts, assess_pool, assess_version
from router.protocol import POOL_FAULTS

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "deploy" / "systemd" / "zeropool.service"
DOCKERFILE = ROOT / "deploy" / "docker" / "Dockerfile"
K8S_FILES = sorted((ROOT / "deploy" / "k8s").glob("*.yaml"))
DOCS = ROOT / "docs" / "deploy.md"
STATE_DIR = "/var/lib/zeropool"
# The longest a graceful stop can take: in-flight work, then STOP -> SIGTERM -> SIGKILL.
WORST_STOP_S = SHUTDOWN_DRAIN_S + config.STOP_GRACE_S + config.TERM_GRACE_S
POOL_NAMES = {"pool", "zp"}  # docs/deploy.md's `zp` is an alias of the service's `pool`
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


# -- the `pool` CLI, asked through --help in a subprocess ---------------------------------------

def pool_argv() -> list[str]:
    script = Path(sys.executable).with_name("pool")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from cli.main import app; app(prog_name='pool')"]


@cache
def help_text(words: tuple[str, ...]) -> str | None:
    """`pool WORDS --help`, or None when WORDS is not a command."""
    env = {**os.environ, "COLUMNS": "250", "NO_COLOR": "1", "TERM": "dumb"}
    out = subprocess.run([*pool_argv(), *words, "--help"], capture_output=True, text=True,
                         env=env, timeout=60)
    return out.stdout if out.returncode == 0 else None


def check_invocation(args: list[str]) -> list[str]:
    """Problems with `pool ARGS`: an unknown (sub)command or a flag it does not take."""
    words: list[str] = []
    rest = list(args)
    while rest and not rest[0].startswith("-"):
        word = rest.pop(0)
        if help_text((*words, word)) is None:
            return [f"`pool {' '.join((*words, word))}` is not a command"]
        words.append(word)
        if "COMMAND [ARGS]" not in (help_text(tuple(words)) or ""):
            break  # a leaf command: what follows are its arguments and options
    known = set(FLAG.findall(help_text(tuple(words)) or ""))
    return [f"`pool {' '.join(words)}` has no flag {flag}"
            for flag in (a.split("=", 1)[0] for a in rest if a.startswith("--"))
            if flag not in known]


# -- finding `pool` invocations in shell, exec arrays and Python snippets ---------------------

def shell_invocations(script: str) -> list[list[str]]:
    """The argument lists of every `pool` (or `zp`) command in a shell script."""
    found = []
    for line in script.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        tokens = list(lexer)
        for i, token in enumerate(tokens):
            if token in POOL_NAMES or (Path(token).name == "pool" and "/" in token):
                args = []
                for arg in tokens[i + 1:]:
                    if set(arg) <= set("();<>|&"):
                        break
                    args.append(arg)
                if args:
                    found.append(args)
    return found


def exec_invocations(argv: list[str]) -> list[list[str]]:
    """`pool` commands run by an exec array: directly, through `sh -c` or `python3 -c`."""
    if len(argv) >= 3 and Path(argv[0]).name in ("sh", "bash") and argv[1] == "-c":
        return shell_invocations(argv[2])
    if len(argv) >= 3 and Path(argv[0]).name.startswith("python") and argv[1] == "-c":
        lists = re.findall(r'\[\s*"pool"(?:\s*,\s*"[^"]*")*\s*\]', argv[2])
        return [json.loads(found)[1:] for found in lists]
    for i, arg in enumerate(argv):
        if Path(arg).name == "pool":
            return [argv[i + 1:]]
    return []


def unit_settings() -> list[tuple[str, str]]:
    text = UNIT.read_text().replace("\\\n", " ")
    return [(key.strip(), value.strip()) for key, _, value in
            (line.partition("=") for line in text.splitlines())
            if key.strip() and not key.startswith(("#", ";", "["))]


def unit_value(key: str) -> list[str]:
    return [value for k, value in unit_settings() if k == key]


def dockerfile_instruction(name: str) -> str:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    lines = [line for line in text.splitlines() if line.split(" ", 1)[0] == name]
    assert len(lines) == 1, f"expected one {name} in the Dockerfile"
    return lines[0].split(" ", 1)[1].strip()


def dockerfile_healthcheck() -> list[str]:
    """The HEALTHCHECK's CMD as an exec array."""
    cmd = dockerfile_instruction("HEALTHCHECK").split(" CMD ", 1)[1].strip()
    return json.loads(cmd) if cmd.startswith("[") else ["/bin/sh", "-c", cmd]


def entrypoint() -> list[str]:
    return json.loads(dockerfile_instruction("ENTRYPOINT"))


def k8s_documents() -> list[dict]:
    return [doc for path in K8S_FILES for doc in yaml.safe_load_all(path.read_text()) if doc]


def daemonset_pod() -> dict:
    (ds,) = [d for d in k8s_documents() if d["kind"] == "DaemonSet"]
    return ds["spec"]["template"]["spec"]


def main_container() -> dict:
    (container,) = daemonset_pod()["containers"]
    return container


def container_argv(container: dict) -> list[str]:
    """What the container runs: its command, or the image's ENTRYPOINT, then its args."""
    return [*container.get("command", entrypoint()), *container.get("args", [])]


def k8s_exec_commands() -> dict[str, list[str]]:
    pod = daemonset_pod()
    out = {}
    for container in pod.get("initContainers", []) + pod["containers"]:
        name = container["name"]
        out[name] = container_argv(container)
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            if probe in container:
                out[f"{name}.{probe}"] = container[probe]["exec"]["command"]
        hook = container.get("lifecycle", {}).get("preStop")
        if hook:
            out[f"{name}.preStop"] = hook["exec"]["command"]
    return out


def k8s_job_commands() -> list[list[str]]:
    """What the Jobs' containers run (the fleet rollout)."""
    return [container_argv(container) for doc in k8s_documents() if doc["kind"] == "Job"
            for container in doc["spec"]["template"]["spec"]["containers"]]


def test_the_fleet_job_rotates_every_pod_over_the_control_port() -> None:
    (job,) = k8s_job_commands()
    args = exec_invocations(job)[0]
    assert args[:2] == ["fleet", "rotate"]
    assert args[args.index("--pools") + 1] == "dns://zeropool-pods:5556"
    serve = serve_args(container_argv(main_container()))
    assert serve[serve.index("--join") + 1] == "dns://zeropool-pods:5555"


def doc_commands() -> list[list[str]]:
    text = DOCS.read_text()
    found = []
    for block in re.findall(r"```sh\n(.*?)```", text, re.S):
        found += shell_invocations(block)
    for span in re.findall(r"`((?:pool|zp) [^`]+)`", text):
        found += shell_invocations(span)
    return found


def all_invocations() -> dict[str, list[list[str]]]:
    unit = [inv for key, value in unit_settings() if key.startswith("Exec")
            for inv in shell_invocations(value.lstrip("-+@:!"))]
    docker = [exec_invocations([*entrypoint(), *json.loads(dockerfile_instruction("CMD"))])[0],
              *exec_invocations(dockerfile_healthcheck())]
    k8s = [inv for argv in [*k8s_exec_commands().values(), *k8s_job_commands()]
           for inv in exec_invocations(argv)]
    return {"systemd": unit, "docker": docker, "k8s": k8s, "docs": doc_commands()}


# -- the files parse and hang together ----------------------------------------------------------

def test_every_k8s_document_parses_and_names_itself():
    assert K8S_FILES
    docs = k8s_documents()
    assert {d["kind"] for d in docs} >= {"DaemonSet", "Service"}
    for doc in docs:
        assert doc["apiVersion"] and doc["kind"] and doc["metadata"]["name"], doc


@pytest.mark.parametrize("where", ["systemd", "docker", "k8s", "docs"])
def test_every_pool_command_and_flag_exists(where):
    invocations = all_invocations()[where]
    assert invocations, f"no pool command found in the {where} files"
    problems = [p for args in invocations for p in check_invocation(args)]
    assert not problems, "\n".join(problems)


def serve_args(argv: list[str]) -> list[str]:
    (args,) = [a for a in exec_invocations(argv) if a and a[0] == "serve"]
    return args


def test_the_three_ways_serve_the_same_way():
    unit_serve = [a for v in unit_value("ExecStart") for a in shell_invocations(v)]
    docker_serve = serve_args([*entrypoint(), *json.loads(dockerfile_instruction("CMD"))])
    k8s_serve = serve_args(container_argv(main_container()))
    for args in (unit_serve[0], docker_serve, k8s_serve):
        assert args[0] == "serve"
        text = " ".join(args)
        assert "--bind tcp://0.0.0.0:5555" in text and "--metrics-port 9464" in text
        assert "--log-json" in args
        # A restart must serve the registry's active version, not undo a rotation.
        assert "--path" not in args and "--version" not in args
    assert "--metrics-host 0.0.0.0" in " ".join(docker_serve)


def test_systemd_unit_stops_gracefully_and_is_hardened():
    settings = dict(unit_settings())
    assert settings["User"] == "zeropool"
    assert settings["StateDirectory"] == "zeropool"
    assert f"ZEROPOOL_STATE_DIR={STATE_DIR}" in unit_value("Environment")
    assert "HF_HUB_OFFLINE=1" in unit_value("Environment")
    assert "ExecStop" not in settings  # SIGTERM is the graceful stop
    assert settings["KillSignal"] == "SIGTERM"
    assert settings["KillMode"] == "mixed"  # not the workers at the same moment
    assert float(settings["TimeoutStopSec"].rstrip("s")) >= WORST_STOP_S + 10
    assert settings["Restart"] == "on-failure"
    for key, value in {"NoNewPrivileges": "yes", "ProtectSystem": "strict",
                       "PrivateTmp": "yes", "ProtectHome": "yes"}.items():
        assert settings[key] == value, key
    assert STATE_DIR in settings["ReadWritePaths"].split()
    assert "PrivateDevices" not in settings  # would hide /dev/nvidia*


def test_dockerfile_runs_non_root_with_state_on_a_volume():
    assert f"ZEROPOOL_STATE_DIR={STATE_DIR}" in DOCKERFILE.read_text()
    assert STATE_DIR in json.loads(dockerfile_instruction("VOLUME"))
    assert set(dockerfile_instruction("EXPOSE").split()) == {"5555", "9464"}
    user = dockerfile_instruction("USER").split(":")[0]
    assert user.isdigit() and int(user) != 0
    assert entrypoint()[-1] == "pool"
    health = exec_invocations(dockerfile_healthcheck())
    assert health and health[0][0] == "health"
    stop_timeout = re.search(r"--stop-timeout (\d+)", DOCKERFILE.read_text())
    assert stop_timeout and int(stop_timeout.group(1)) >= WORST_STOP_S + 10


def test_k8s_pod_stops_gracefully_and_mounts_its_state():
    pod = daemonset_pod()
    container = main_container()
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["ZEROPOOL_STATE_DIR"] == STATE_DIR and env["HF_HUB_OFFLINE"] == "1"
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert STATE_DIR in mounts
    prestop = exec_invocations(container["lifecycle"]["preStop"]["exec"]["command"])
    assert prestop == [["stop"]]
    sleep = re.search(r"sleep (\d+)", " ".join(container["lifecycle"]["preStop"]["exec"]
                                               ["command"]))
    assert pod["terminationGracePeriodSeconds"] >= (
        WORST_STOP_S + (int(sleep.group(1)) if sleep else 0) + 10)
    assert container["resources"]["limits"]["nvidia.com/gpu"] >= 1
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert exec_invocations(container[probe]["exec"]["command"])[0][0] == "health"
    (ds,) = [d for d in k8s_documents() if d["kind"] == "DaemonSet"]
    assert ds["spec"]["updateStrategy"]["rollingUpdate"]["maxSurge"] == 0


def test_k8s_services_point_at_the_container_ports():
    container = main_container()
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    text = " ".join(serve_args(container_argv(container)))
    assert f"tcp://0.0.0.0:{ports['frontend']}" in text
    assert f"--metrics-port {ports['metrics']}" in text
    services = [d for d in k8s_documents() if d["kind"] == "Service"]
    assert services
    for service in services:
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports, port
        notes = service["metadata"].get("annotations", {})
        if notes.get("prometheus.io/scrape") == "true":
            assert int(notes["prometheus.io/port"]) == ports["metrics"]


# -- what the probes make of each `pool health` outcome -----------------------------------------

def version_report(name: str, *, wanted: int, ready: int, failed: str | None = None) -> dict:
    workers = [{"id": f"{name}-{i}", "state": "ready" if i < ready else "loading",
                "last_heartbeat_s": 0.5} for i in range(wanted)]
    return assess_version(VersionFacts(
        version=name, workers_wanted=wanted, workers=workers, failed=failed, crash_loop=None,
        ever_ready=ready > 0, recent_crashes=0, replies_by_code={}, golden=None,
        pool_faults=POOL_FAULTS))


def health_json(active: str | None, versions: dict[str, dict]) -> str:
    pool = assess_pool(versions, active, stopping=False)
    return json.dumps({"status": pool["status"], "exit_code": {"healthy": 0, "degraded": 1,
                       "failed": 2}[pool["status"]], "pool": pool, "active": active,
                       "versions": versions})


NOT_RUNNING = json.dumps({"ok": False, "error": {"code": "not_running", "message": "no pool"}})
SCENARIOS = {
    # name: (pool health's stdout, its exit status, alive?, ready?)
    "healthy": (health_json("v1", {"v1": version_report("v1", wanted=2, ready=2)}),
                0, True, True),
    "rotating": (health_json("v1", {"v1": version_report("v1", wanted=2, ready=2),
                                    "v2": version_report("v2", wanted=2, ready=0)}),
                 0, True, True),
    "one worker restarting": (health_json("v1", {"v1": version_report("v1", wanted=2,
                                                                      ready=1)}),
                              1, True, True),
    "starting": (health_json("v1", {"v1": version_report("v1", wanted=2, ready=0)}),
                 1, True, False),
    "failed": (health_json("v1", {"v1": version_report("v1", wanted=2, ready=0,
                                                       failed="crash loop")}),
               2, False, False),
    "not running": (NOT_RUNNING, 2, False, False),
    "garbled": ("not json", 1, True, False),
}


@pytest.fixture
def fake_pool(tmp_path):
    """A `pool` on PATH that prints a canned `pool health` answer and exits with its status."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "pool"
    script.write_text('#!/bin/sh\necho "$@" >> "$FAKE_POOL_CALLS"\n'
                      'cat "$FAKE_POOL_OUT"\nexit "$FAKE_POOL_RC"\n')
    script.chmod(0o755)

    def run(argv: list[str], out: str, rc: int) -> int:
        (tmp_path / "out").write_text(out)
        calls = tmp_path / "calls"
        calls.write_text("")
        if Path(argv[0]).name.startswith("python"):
            argv = [sys.executable, *argv[1:]]
        env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
               "FAKE_POOL_OUT": str(tmp_path / "out"), "FAKE_POOL_RC": str(rc),
               "FAKE_POOL_CALLS": str(calls)}
        result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=30)
        assert calls.read_text().startswith("health"), (argv, calls.read_text())
        return result.returncode

    return run


def test_health_fixtures_match_pool_health_exit_statuses():
    for name, (out, rc, _alive, _ready) in SCENARIOS.items():
        if out.startswith("{") and "exit_code" in out:
            assert json.loads(out)["exit_code"] == rc, name


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_probes_map_health_as_documented(fake_pool, scenario):
    out, rc, alive, ready = SCENARIOS[scenario]
    container = main_container()
    checks = {
        "k8s startupProbe": (container["startupProbe"]["exec"]["command"], alive),
        "k8s livenessProbe": (container["livenessProbe"]["exec"]["command"], alive),
        "k8s readinessProbe": (container["readinessProbe"]["exec"]["command"], ready),
        "docker HEALTHCHECK": (dockerfile_healthcheck(), alive),
    }
    for what, (argv, expect) in checks.items():
        status = fake_pool(argv, out, rc)
        if what.startswith("docker"):
            assert status in (0, 1), status  # Docker reserves exit status 2
        assert (status == 0) == expect, f"{what} in scenario {scenario!r}: exit {status}"


# -- docs/deploy.md says what the code does -----------------------------------------------------

def test_docs_name_real_metrics_and_log_file():
    text = DOCS.read_text()
    source = (ROOT / "pool" / "metrics.py").read_text()
    names = set(re.findall(r"\bzeropool_[a-z_]+[a-z]", text))
    assert len(names) > 10
    for name in names:
        base = name.removesuffix("_total")
        assert f'"{base}"' in source, f"{name} is not a metric of pool/metrics.py"
    assert f"`{config.LOG_FILE}`" in text
    assert f"{config.LOG_FILE_MAX_BYTES // 2**20} MB × {config.LOG_FILE_BACKUPS}" in text
