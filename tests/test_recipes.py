"""The cluster recipes under infra/, checked for real (CPU only).

- Ray cluster launcher config: validated against the ``ray-schema.json`` shipped in the installed Ray
  wheel and by Ray's own ``prepare_config``/``validate_config``; its ``ray start`` flags parsed by Ray's
  own CLI; the ``ray job submit`` example parsed by ``selva``'s CLI and sized against the node types.
- KubeRay RayJob: the fields the RayJob CRD (and the KubeRay operator's validation) require, a GPU group,
  one shared PVC at one path in every pod, a private dashboard, token auth; the entrypoint parsed by
  ``selva``'s CLI parser and sized against the worker groups.
- Slurm: the script's own launch line trains the tiny config on two fake "nodes" (two tasks, gloo, CPU);
  its requeue decisions are exercised with a fake rank and a fake ``scontrol``.
- DeepSpeed hostfile: parsed by DeepSpeed's own hostfile parser.
- MLflow server script: refuses 0.0.0.0; starts ``mlflow server`` with basic auth, artifacts proxied,
  a generated auth config readable by MLflow, no secret on the command line (a stand-in records the
  call: the installed mlflow lacks Flask-WTF, which the basic-auth app needs, so no server is started).
- Security over every file under infra/: no 0.0.0.0 bind without auth in the same recipe, Ray token
  auth wherever Ray starts, no literal secret.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.tracking_servers import closed_port
from tests.train_launch import REPO, explain, job_env, start_job

INFRA = REPO / "infra"
CLUSTER_YAML = INFRA / "ray" / "cluster.yaml"
RAYJOB_YAML = INFRA / "kuberay" / "rayjob-precompute.yaml"
SBATCH = INFRA / "slurm" / "train.sbatch"
HOSTFILE = INFRA / "deepspeed" / "hostfile.example"
MLFLOW_SH = INFRA / "mlflow" / "server.sh"
SHARED = "/shared"  # the shared file system's mount point in every recipe
PUBLIC_BINDS = {"0.0.0.0", "::", "[::]", "*"}


# ------------------------------------------------------------------------------------------- helpers
def load_yaml_docs(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def recipe_files() -> list[Path]:
    files = sorted(p for p in INFRA.rglob("*") if p.is_file())
    assert files, f"no recipe under {INFRA}"
    return files


_COMMENT = re.compile(r"(^|\s)#.*$")


def code_text(path: Path) -> str:
    """The part of a recipe that takes effect: comments removed; for Markdown, fenced code blocks only."""
    lines, inside = [], False
    for line in path.read_text().splitlines():
        if path.suffix == ".md":
            if line.lstrip().startswith("```"):
                inside = not inside
                continue
            if not inside:
                continue
        lines.append(_COMMENT.sub("", line))
    return "\n".join(lines)


def walk(node: Any):
    """Every dict, list and scalar inside a parsed YAML document."""
    yield node
    if isinstance(node, dict):
        for value in node.values():
            yield from walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from walk(value)


def precompute_args(command: str):
    """Parse a ``selva precompute ...`` command with selva's own CLI parser (nothing runs)."""
    from pipelines.precompute_config import config_from_args
    from selva_cli.main import build_parser

    tokens = shlex.split(command)
    assert tokens[:2] == ["selva", "precompute"], f"not a selva precompute command: {command!r}"
    try:
        args = build_parser().parse_args(tokens[1:])
    except SystemExit as err:  # argparse has printed why (captured by pytest)
        raise AssertionError(f"selva's CLI rejects {command!r} (exit {err.code})") from None
    return config_from_args(args)


def ray_start_context(args: list[str]):
    """Parse ``ray start`` arguments with Ray's own click command (an unknown option fails)."""
    from ray.scripts.scripts import start

    return start.make_context("ray start", list(args))


def cpu_quantity(value: Any) -> float:
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def assert_precompute_fits(cfg, *, gpus: float, cpus: float, where: str) -> None:
    """The precompute command on a cluster: official encoders, everything on the shared mount, one encoder
    actor per GPU, and decode tasks plus encoder actors within the workers' CPUs."""
    assert cfg.preset == "small_16k" and cfg.encoders == "official" and cfg.weights, where
    for name in ("input", "out", "media_root", "weights"):
        value = str(getattr(cfg, name))
        assert value.startswith(SHARED + "/"), f"{where}: --{name.replace('_', '-')} {value} is not on {SHARED}"
    assert cfg.encoder_actors >= 1 and cfg.gpus_per_encoder == 1, f"{where}: not the two-stage design, 1 GPU each"
    assert cfg.encoder_actors * cfg.gpus_per_encoder <= gpus, (
        f"{where}: {cfg.encoder_actors} encoder actors x {cfg.gpus_per_encoder} GPU > {gpus} GPUs in the cluster")
    needed = cfg.workers + cfg.encoder_actors * cfg.encoder_cpus
    assert needed <= cpus, f"{where}: {cfg.workers} decode tasks + encoder actors need {needed} CPUs > {cpus}"


# --------------------------------------------------------------------------------- security scanners
_BIND = re.compile(r"""(?<![\w-])(--dashboard-host|dashboard-host|--host|--bind)(?:\s*[=:]\s*|\s+)["']?([^\s"',;)]+)""")
_SECRET = re.compile(
    r"""(?i)(?P<key>[\w.-]*(?:password|passwd|secret|token|api[_-]?key|access[_-]?key)[\w.-]*)["']?\s*[:=]"""
    r"""[ \t]*(?P<value>[^\s,}#]*)""")
_URI_CREDENTIALS = re.compile(r"://[^/\s:@'\"]+:(?P<value>[^@\s/'\"]+)@")
_RANDOM_LOOKING = re.compile(r"(?<![\w/.-])(?=[\w+-]*\d)(?=[\w+-]*[A-Za-z])[A-Za-z0-9+_-]{32,}")


def auth_on(text: str, docs: list[Any] | None = None) -> bool:
    """Authentication on, somewhere in this recipe: Ray token auth or MLflow's basic-auth app."""
    if re.search(r"RAY_AUTH_MODE=token|--app-name[= ]basic-auth", text):
        return True
    for node in walk(docs or []):
        if isinstance(node, dict):
            if (node.get("authOptions") or {}).get("mode") == "token":
                return True
            if node.get("name") == "RAY_AUTH_MODE" and node.get("value") == "token":
                return True
    return False


def public_binds(code: str) -> list[str]:
    """Every bind of a dashboard/jobs API/server to all interfaces, or to an address only known at run
    time (a variable), and every bare 0.0.0.0 in a recipe's code."""
    found = [f"{flag} {value}" for flag, value in _BIND.findall(code)
             if value.strip("\"'") in PUBLIC_BINDS or value.startswith("$")]
    found += [line.strip() for line in code.splitlines() if "0.0.0.0" in line]
    return found


def placeholder(value: str) -> bool:
    v = value.strip("\"'")
    return (v == "" or v.startswith(("$", "<", "{", "/", "~/", "./")) or set(v) <= {".", "*"}
            or re.fullmatch(r"[A-Z][A-Z0-9_]*", v) is not None or "REPLACE" in v or "CHANGE_ME" in v)


def literal_secrets(text: str) -> list[str]:
    """Lines that put a literal secret in a file (comments included: an example password leaks too)."""
    found = []
    for n, line in enumerate(text.splitlines(), 1):
        for m in _SECRET.finditer(line):
            key = m["key"]
            if key.lower().endswith(("_path", "_file", "ref", "name", "_mode")):
                continue  # names a file, a Secret or a mode, not a value
            if not placeholder(m["value"]):
                found.append(f"line {n}: {key}={m['value']}")
        found += [f"line {n}: password in a URI" for m in _URI_CREDENTIALS.finditer(line)
                  if not placeholder(m["value"])]
        found += [f"line {n}: random-looking literal {m[0][:8]}..." for m in _RANDOM_LOOKING.finditer(line)]
    return found


@pytest.mark.parametrize("text, expected", [
    ("password: hunter2", True), ("MLFLOW_TRACKING_PASSWORD=s3cr3t-pw", True), ('"token": "abc123"', True),
    ("uri: postgresql://mlflow:pa55word@db:5432/mlflow", True), ("RAY_AUTH_TOKEN=a1b2c3d4e5f6a7b8c9d0e1f2a3b4", True),
    ('curl -H "Authorization: Bearer 9f8e7d6c5b4a39281706f5e4d3c2b1a0ffee"', True),
    ("password: ${PW}", False), ("MLFLOW_TRACKING_PASSWORD=$PW", False), ("password: <from-vault>", False),
    ("RAY_AUTH_TOKEN_PATH=$HOME/.ray/auth_token", False), ("secretKeyRef: {name: s, key: password}", False),
    ("uri: postgresql://mlflow@db:5432/mlflow", False), ("tracking_uri=https://USER:PASSWORD@HOST", False),
])
def test_the_secret_scanner_finds_literals_and_passes_references(text, expected):
    assert bool(literal_secrets(text)) is expected, f"{text!r}: {literal_secrets(text)}"


@pytest.mark.parametrize("code, expected", [
    ("ray start --head --dashboard-host=0.0.0.0", True), ("mlflow server --host 0.0.0.0", True),
    ('mlflow server --host "$host"', True), ('dashboard-host: "0.0.0.0"', True), ("--bind=[::]", True),
    ("ray start --head --dashboard-host=127.0.0.1", False), ("mlflow server --host 10.0.3.7", False),
    ("first_host node[01-02]", False),
])
def test_the_bind_scanner_finds_public_binds(code, expected):
    assert bool(public_binds(code)) is expected, f"{code!r}: {public_binds(code)}"


# ------------------------------------------------------------------------------ Ray cluster launcher
def cluster_config() -> dict:
    (config,) = load_yaml_docs(CLUSTER_YAML)
    return config


def test_ray_cluster_config_validates_against_the_schema_in_the_ray_wheel():
    import copy

    import jsonschema
    import ray
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema_path = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"
    schema = json.loads(schema_path.read_text())
    config = cluster_config()
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in validator.iter_errors(config)]
    assert not errors, f"{CLUSTER_YAML} against {schema_path}:\n" + "\n".join(errors)
    # what `ray up` does next: fill the provider's defaults, validate again, check the node types
    validate_config(prepare_config(copy.deepcopy(config)))

    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["resources"].get("CPU") == 0, (
        f"the head must take no tasks and no GPU work: {head['resources']}")
    workers = {name: t for name, t in types.items() if name != config["head_node_type"]}
    assert any(t["resources"].get("GPU", 0) == 0 and t["resources"].get("CPU", 0) > 0 for t in workers.values()), (
        "no CPU worker type for decoding")
    assert any(t["resources"].get("GPU", 0) >= 1 for t in workers.values()), "no GPU worker type for encoder actors"


def _ray_start_commands(config: dict) -> dict[str, list[str]]:
    found = {}
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        found[key] = [segment.strip() for command in config[key] for segment in command.split(";")
                      if "ray start" in segment]
    return found


def _split_env_and_args(segment: str) -> tuple[dict[str, str], list[str]]:
    tokens = shlex.split(segment)
    at = tokens.index("ray")
    assert tokens[at + 1] == "start", segment
    env = dict(t.split("=", 1) for t in tokens[:at])
    return env, tokens[at + 2:]


def test_ray_cluster_starts_every_node_with_token_auth_and_a_loopback_dashboard():
    config = cluster_config()
    starts = _ray_start_commands(config)
    assert starts["head_start_ray_commands"] and starts["worker_start_ray_commands"], starts
    ssh_home = f"/home/{config['auth']['ssh_user']}"
    for key, segments in starts.items():
        for segment in segments:
            env, args = _split_env_and_args(segment)
            assert env.get("RAY_AUTH_MODE") == "token", f"{key}: ray start without RAY_AUTH_MODE=token: {segment}"
            token_path = env.get("RAY_AUTH_TOKEN_PATH", "").replace("$HOME", ssh_home)
            assert token_path or env.get("RAY_AUTH_TOKEN", "").startswith("$"), f"{key}: no token source: {segment}"
            if token_path:  # provisioned by file_mounts from outside this repository
                local = config["file_mounts"].get(token_path)
                assert local, f"{key}: token file {token_path} is not provisioned by file_mounts"
                local_path = Path(local).expanduser().resolve()
                assert not local_path.is_relative_to(REPO), f"the token would come from the repository: {local}"
            params = ray_start_context(args).params  # Ray's own CLI: every flag must exist
            if params["head"]:
                assert params["dashboard_host"] in ("127.0.0.1", "localhost"), (
                    f"dashboard bound to {params['dashboard_host']}: reach it through `ray dashboard`'s tunnel")
    assert all(not _split_env_and_args(s)[1].count("--head") for s in starts["worker_start_ray_commands"])


def test_ray_cluster_submit_example_is_a_valid_precompute_that_fits_the_cluster():
    config = cluster_config()
    lines = [line.lstrip("#").strip() for line in CLUSTER_YAML.read_text().splitlines()]
    start = next(i for i, line in enumerate(lines) if "ray job submit" in line)
    command = []
    for line in lines[start:]:
        command.append(line.rstrip("\\").strip())
        if not line.endswith("\\"):
            break
    tokens = shlex.split(" ".join(command))
    assert tokens[tokens.index("--address") + 1] == "http://127.0.0.1:8265", "submit through the ssh tunnel"
    assert tokens[0] == "RAY_AUTH_MODE=token", "the client sends the token only with RAY_AUTH_MODE=token"
    selva = " ".join(shlex.quote(t) for t in tokens[tokens.index("--") + 1:])
    cfg = precompute_args(selva)

    workers = [t for name, t in config["available_node_types"].items() if name != config["head_node_type"]]
    gpus = sum(t["resources"].get("GPU", 0) * t["max_workers"] for t in workers)
    cpus = sum(t["resources"].get("CPU", 0) * t["max_workers"] for t in workers)
    assert_precompute_fits(cfg, gpus=gpus, cpus=cpus, where=f"{CLUSTER_YAML.name} submit example")
    assert cfg.encoder_actors == 16, "the documented example: 16 encoder actors on two 8-GPU nodes"
    mounts = [c for c in config["setup_commands"] if "mount" in c and SHARED in c]
    assert mounts, f"no setup command mounts the shared file system at {SHARED}"


# -------------------------------------------------------------------------------------------- KubeRay
def rayjob() -> dict:
    (doc,) = load_yaml_docs(RAYJOB_YAML)
    return doc


def _pods(job: dict) -> dict[str, dict]:
    spec = job["spec"]["rayClusterSpec"]
    pods = {"head": spec["headGroupSpec"]["template"]["spec"]}
    pods.update({g["groupName"]: g["template"]["spec"] for g in spec["workerGroupSpecs"]})
    return pods


def test_rayjob_has_the_fields_the_crd_requires():
    """What a RayJob needs to be accepted and reconciled (RayJob CRD ray.io/v1 and the operator's checks):
    apiVersion ray.io/v1, kind RayJob, metadata.name (a DNS-1123 label), spec.entrypoint (required unless
    the job is submitted by hand), spec.rayClusterSpec.headGroupSpec.template.spec.containers (each with
    name and image), and for every workerGroupSpec: a unique groupName, template.spec.containers (name,
    image) and 0 <= minReplicas <= replicas <= maxReplicas."""
    job = rayjob()
    assert job.get("apiVersion") == "ray.io/v1", job.get("apiVersion")
    assert job.get("kind") == "RayJob", job.get("kind")
    name = job.get("metadata", {}).get("name", "")
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", name), f"metadata.name {name!r}"
    assert str(job["spec"].get("entrypoint", "")).strip(), "spec.entrypoint is empty"
    cluster = job["spec"]["rayClusterSpec"]
    groups = cluster["workerGroupSpecs"]
    names = [g.get("groupName") for g in groups]
    assert all(names) and len(set(names)) == len(names), f"groupName missing or repeated: {names}"
    for group in groups:
        lo, n, hi = group.get("minReplicas", 0), group.get("replicas", 0), group.get("maxReplicas", 2**31)
        assert all(isinstance(v, int) for v in (lo, n, hi)) and 0 <= lo <= n <= hi, (
            f"{group['groupName']}: minReplicas {lo} <= replicas {n} <= maxReplicas {hi} does not hold")
    for pod_name, pod in _pods(job).items():
        containers = pod.get("containers")
        assert containers, f"{pod_name}: template.spec.containers is empty"
        for c in containers:
            assert c.get("name") and c.get("image"), f"{pod_name}: a container without name or image: {c}"


def test_rayjob_gpu_group_shared_volume_token_auth_and_private_dashboard():
    job = rayjob()
    spec, cluster = job["spec"], job["spec"]["rayClusterSpec"]
    assert spec.get("shutdownAfterJobFinishes") is True, "the cluster must be deleted when the job ends"

    gpu_groups = []
    for group in cluster["workerGroupSpecs"]:
        for c in group["template"]["spec"]["containers"]:
            limits, requests = c.get("resources", {}).get("limits", {}), c.get("resources", {}).get("requests", {})
            if "nvidia.com/gpu" in limits:
                gpus = limits["nvidia.com/gpu"]
                assert requests.get("nvidia.com/gpu", gpus) == gpus, "extended resources: requests must equal limits"
                gpu_groups.append((group["groupName"], gpus))
    assert gpu_groups and all(g > 0 for _, g in gpu_groups), f"no worker group limits nvidia.com/gpu: {gpu_groups}"

    claims = set()
    for pod_name, pod in _pods(job).items():
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for c in pod["containers"]:
            mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
            assert set(mounts.values()) <= set(volumes), f"{pod_name}: a volumeMount without its volume: {mounts}"
            assert SHARED in mounts, f"{pod_name}/{c['name']}: the shared volume is not mounted at {SHARED}"
            pvc = volumes[mounts[SHARED]].get("persistentVolumeClaim", {}).get("claimName")
            assert pvc, f"{pod_name}: {SHARED} is not a PersistentVolumeClaim"
            claims.add(pvc)
    assert len(claims) == 1, f"every pod must mount the same claim at {SHARED}: {claims}"

    # token auth (KubeRay >= 1.5.1 authOptions; Ray >= 2.52), the Ray the project pins
    assert cluster.get("authOptions", {}).get("mode") == "token", "spec.rayClusterSpec.authOptions.mode != token"
    pinned = re.search(r'"ray\[[^]]*\]==([\d.]+)"', (REPO / "pyproject.toml").read_text())[1]
    assert cluster.get("rayVersion") == pinned, f"rayVersion {cluster.get('rayVersion')} != the pinned Ray {pinned}"
    assert tuple(map(int, pinned.split(".")[:2])) >= (2, 52), "token auth needs Ray >= 2.52"
    # the dashboard stays inside the cluster
    head = cluster["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP", f"head service {head.get('serviceType')}"
    assert not head.get("enableIngress"), "no Ingress for the dashboard"
    services = [n for n in walk(load_yaml_docs(RAYJOB_YAML)) if isinstance(n, dict) and n.get("kind") == "Service"]
    assert not [s for s in services if s.get("spec", {}).get("type") in ("LoadBalancer", "NodePort")], services
    # rayStartParams are `ray start` flags: Ray's own CLI must know each of them
    ray_start_context(["--head"] + [f"--{k}={v}" for k, v in head.get("rayStartParams", {}).items()])
    for group in cluster["workerGroupSpecs"]:
        ray_start_context(["--address=head:6379"] + [f"--{k}={v}" for k, v in group.get("rayStartParams", {}).items()])


def test_rayjob_entrypoint_is_a_valid_precompute_that_fits_the_worker_groups():
    job = rayjob()
    cfg = precompute_args(job["spec"]["entrypoint"])
    gpus = cpus = 0.0
    for group in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]:
        for c in group["template"]["spec"]["containers"]:
            limits = c.get("resources", {}).get("limits", {})
            gpus += group["replicas"] * float(limits.get("nvidia.com/gpu", 0))
            cpus += group["replicas"] * cpu_quantity(limits.get("cpu", 0))
    head_cpus = job["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"].get("num-cpus")
    assert head_cpus == "0", "the head takes no decode task (num-cpus 0): the sizing counts workers only"
    assert_precompute_fits(cfg, gpus=gpus, cpus=cpus, where=RAYJOB_YAML.name)
    assert cfg.encoder_actors == gpus, f"{cfg.encoder_actors} encoder actors for {gpus} GPUs: one per GPU"


# ----------------------------------------------------------------------------------------------- Slurm
def _fake_bin(tmp_path: Path) -> tuple[Path, Path]:
    """A fake ``scontrol`` (``show hostnames`` prints $FAKE_HOSTS) and a fake ``srun`` (runs its command as
    one task); both record their calls in the log."""
    bin_dir, log = tmp_path / "bin", tmp_path / "slurm.log"
    bin_dir.mkdir()
    fakes = {
        "scontrol": 'if [[ $1 == show && $2 == hostnames ]]; then printf \'%s\\n\' $FAKE_HOSTS; fi',
        "srun": 'while [[ $1 == --* ]]; do shift; done; exec "$@"',
    }
    for name, body in fakes.items():
        (bin_dir / name).write_text(f'#!/bin/bash\necho "{name} $*" >> {shlex.quote(str(log))}\n{body}\n')
        (bin_dir / name).chmod(0o755)
    log.touch()
    return bin_dir, log


def _slurm_env(bin_dir: Path, **extra: str) -> dict[str, str]:
    env = job_env(SRUN="", SELVA_REPO=str(REPO), SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="node[01-02]",
                  FAKE_HOSTS="127.0.0.1 127.0.0.2", PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    for name in ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "SLURM_PROCID", "SLURM_RESTART_COUNT"):
        env.pop(name, None)
    env.update(extra)
    return env


def test_slurm_first_host_expands_a_node_list_without_scontrol():
    script = (f"source {shlex.quote(str(SBATCH))}; PATH=/nonexistent; "
              "first_host 'gpu-[007-008,010],cpu1'; first_host 'cpu1,gpu[1-2]'; first_host single")
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, explain(result)
    assert result.stdout.split() == ["gpu-007", "cpu1", "single"], result.stdout


FAKE_RANK = """\
#!/bin/bash
# a stand-in for the training rank: $FAKE_MODE says how it ends
case "$FAKE_MODE" in
    stopped) exit 0 ;;                              # stopped at a checkpoint before the end: no final/
    failed) exit 3 ;;
    term)
        trap 'sleep 1; touch "$FAKE_DIR/checkpointed"; exit 0' TERM
        touch "$FAKE_DIR/started"
        while true; do sleep 0.1; done ;;
esac
"""


@pytest.mark.parametrize("mode, extra, code, requeued", [
    ("stopped", {}, 0, True),
    ("stopped", {"SLURM_RESTART_COUNT": "3", "MAX_RESTARTS": "3"}, 0, False),
    ("failed", {}, 3, False),
    ("term", {}, 0, False),
])
def test_slurm_script_requeues_only_a_run_stopped_at_a_checkpoint(tmp_path, mode, extra, code, requeued):
    """Exit 0 without final/ (the USR1 before the time limit) requeues; a failed run does not (exit code kept),
    nor a run past MAX_RESTARTS; SIGTERM to the batch shell (pre-emption, scancel) is passed on, the shell
    waits for the rank's checkpoint and does not requeue (Slurm requeues a pre-empted job itself)."""
    bin_dir, log = _fake_bin(tmp_path)
    rank = tmp_path / "rank"
    rank.write_text(FAKE_RANK)
    rank.chmod(0o755)
    env = _slurm_env(bin_dir, PYTHON=str(rank), FAKE_MODE=mode, FAKE_DIR=str(tmp_path), SLURM_NTASKS="8", **extra)
    del env["SRUN"]  # the script's own srun line (the fake srun runs it as one task)
    cmd = ["bash", str(SBATCH), "configs/train/tiny.yaml", "dataset=/shared/d", f"out={tmp_path / 'out'}",
           "tracking_uri=https://jobs:hunter2@mlflow.internal"]
    job = start_job(cmd, env=env)
    if mode == "term":
        deadline = time.monotonic() + 30
        while not (tmp_path / "started").exists():
            assert job.poll() is None and time.monotonic() < deadline, job.communicate()
            time.sleep(0.05)
        os.kill(job.pid, signal.SIGTERM)  # the batch shell alone
    stdout, stderr = job.communicate(timeout=60)
    result = f"exit {job.returncode}\n--- stdout\n{stdout}\n--- stderr\n{stderr}"
    assert job.returncode == code, result
    assert "MASTER_ADDR=127.0.0.1 MASTER_PORT=24242" in stdout, result  # scontrol's first host; port from job id
    assert "hunter2" not in stdout + stderr and "://***@mlflow.internal" in stdout, "the URI password is not masked"
    calls = log.read_text()
    assert f"srun --kill-on-bad-exit=1 {rank} -m training.train --config configs/train/tiny.yaml" in calls, calls
    assert ("scontrol requeue 4242" in calls) is requeued, f"calls: {calls!r}\n{result}"
    if mode == "term":
        assert (tmp_path / "checkpointed").exists(), f"the shell did not wait for the rank's checkpoint\n{result}"


def test_slurm_launch_line_trains_on_two_nodes(train_world, tmp_path):
    """The script's own launch line as two Slurm tasks on two fake nodes (SLURM_PROCID 0/1, SLURM_NODEID 0/1,
    SLURM_LOCALID 0): MASTER_ADDR from the node list, the trainer maps the Slurm variables, both ranks
    train tiny for 2 steps on CPU and exit 0, one checkpoint of world size 2 and final/."""
    bin_dir, log = _fake_bin(tmp_path)
    out = tmp_path / "out"
    cmd = ["bash", str(SBATCH), "configs/train/tiny.yaml", f"dataset={train_world}", f"out={out}",
           "loader.batch_size=2", "loader.num_workers=0", "validation.audio_clips=0", "steps=2", "checkpoint_every=2",
           f"tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"]
    port = str(closed_port())
    jobs = [start_job(cmd, env=_slurm_env(bin_dir, PYTHON=sys.executable, MASTER_PORT=port, SLURM_NTASKS="2",
                                          SLURM_PROCID=str(task), SLURM_NODEID=str(task), SLURM_LOCALID="0",
                                          SLURM_CPUS_PER_TASK="1"))
            for task in (0, 1)]
    results = []
    try:
        for job in jobs:
            stdout, stderr = job.communicate(timeout=400)
            results.append((job.returncode, stdout, stderr))
    finally:
        for job in jobs:
            if job.poll() is None:
                os.killpg(job.pid, signal.SIGKILL)
    explained = "\n".join(f"=== task {i}: exit {c}\n--- stdout\n{o[-3000:]}\n--- stderr\n{e[-5000:]}"
                          for i, (c, o, e) in enumerate(results))
    assert [code for code, _, _ in results] == [0, 0], explained
    assert all(f"MASTER_ADDR=127.0.0.1 MASTER_PORT={port} tasks=2" in o for _, o, _ in results), explained
    assert re.search(r"world size\s+2", results[0][1]), explained
    assert f"finished: {out}/final" in results[0][1], explained
    marker = json.loads((out / "checkpoints" / "step-00000002" / "complete.json").read_text())
    assert marker["world_size"] == 2 and marker["step"] == 2, marker
    assert (out / "final").is_dir()
    assert "requeue" not in log.read_text() and "srun" not in log.read_text(), log.read_text()


# ------------------------------------------------------------------------------------------- DeepSpeed
def test_deepspeed_hostfile_parses_with_deepspeeds_own_parser():
    from deepspeed.launcher.runner import fetch_hostfile

    pool = fetch_hostfile(str(HOSTFILE))
    assert pool and len(pool) >= 2, f"{HOSTFILE}: {pool}"
    assert all(slots == 8 for slots in pool.values()), f"8 GPUs per node expected: {dict(pool)}"


# ---------------------------------------------------------------------------------------------- MLflow
def _fake_mlflow(tmp_path: Path) -> Path:
    """Stands in for `mlflow`: records its argv, its environment and the auth config it was given."""
    fake = tmp_path / "mlflow"
    fake.write_text(textwrap.dedent("""\
        #!/bin/bash
        printf '%s\\0' "$@" > "$DUMP/argv"
        env -0 > "$DUMP/env"
        cp "$MLFLOW_AUTH_CONFIG_PATH" "$DUMP/basic_auth.ini"
        stat -c %a "$MLFLOW_AUTH_CONFIG_PATH" > "$DUMP/mode"
        """))
    fake.chmod(0o755)
    return fake


def _mlflow_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(MLFLOW=str(_fake_mlflow(tmp_path)), DUMP=str(tmp_path),
               MLFLOW_BACKEND_STORE_URI="postgresql://mlflow@db.internal:5432/mlflow",
               MLFLOW_AUTH_DATABASE_URI="postgresql://mlflow@db.internal:5432/mlflow_auth?application_name=a%20b",
               MLFLOW_ARTIFACTS_DESTINATION="s3://selva-mlflow/artifacts", MLFLOW_PORT="5055")
    env.update(extra)
    return env


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "[::]", "0", "::0", "0:0:0:0:0:0:0:0", "0x0", " 0.0.0.0"])
def test_mlflow_server_script_refuses_to_listen_on_every_interface(tmp_path, host):
    result = subprocess.run(["bash", str(MLFLOW_SH)], env=_mlflow_env(tmp_path, MLFLOW_HOST=host),
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "every interface" in result.stderr, explain(result)
    assert not (tmp_path / "argv").exists(), "mlflow was started anyway"


def _mlflow_auth_config_reader():
    """``mlflow.server.auth.config.read_auth_config``, loaded from its file: importing the package
    ``mlflow.server.auth`` needs Flask-WTF (``mlflow[auth]``), which this environment does not install."""
    import importlib.util

    import mlflow.server

    path = Path(mlflow.server.__file__).parent / "auth" / "config.py"
    spec = importlib.util.spec_from_file_location("_mlflow_auth_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.read_auth_config


def test_mlflow_server_script_runs_basic_auth_with_secrets_from_the_environment(tmp_path, monkeypatch):
    from mlflow.cli import server

    read_auth_config = _mlflow_auth_config_reader()

    password_file = tmp_path / "admin-password"
    password_file.write_text("correct-horse-battery\n")
    env = _mlflow_env(tmp_path, MLFLOW_AUTH_ADMIN_PASSWORD_FILE=str(password_file))
    result = subprocess.run(["bash", str(MLFLOW_SH)], env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, explain(result)

    argv = (tmp_path / "argv").read_text().split("\0")[:-1]
    seen = dict(item.split("=", 1) for item in (tmp_path / "env").read_text().split("\0") if "=" in item)
    assert argv[0] == "server", argv
    for name in ("MLFLOW_BACKEND_STORE_URI", "MLFLOW_ARTIFACTS_DESTINATION"):
        monkeypatch.setenv(name, env[name])
    params = server.make_context("mlflow server", argv[1:]).params  # mlflow's own CLI: the flags must exist
    assert params["app_name"] == "basic-auth", f"authentication is off: {argv}"
    assert params["serve_artifacts"] is True and params["artifacts_destination"] == env["MLFLOW_ARTIFACTS_DESTINATION"]
    assert params["backend_store_uri"] == env["MLFLOW_BACKEND_STORE_URI"]
    assert params["host"] == "127.0.0.1", f"default bind {params['host']}"

    assert seen.get("MLFLOW_AUTH_ADMIN_PASSWORD") == "correct-horse-battery", "the admin password file was not read"
    assert (tmp_path / "mode").read_text().strip() == "600", "the generated auth config is readable by others"
    ini = (tmp_path / "basic_auth.ini").read_text()
    assert "correct-horse-battery" not in ini + " ".join(argv) + result.stdout, "the admin password leaked"
    assert not Path(seen["MLFLOW_AUTH_CONFIG_PATH"]).exists(), "the generated auth config outlived the server"

    monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", str(tmp_path / "basic_auth.ini"))
    for name in ("MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_AUTH_ADMIN_USERNAME"):
        monkeypatch.delenv(name, raising=False)
    auth = read_auth_config()  # MLflow's own reader, as the basic-auth app uses it
    assert auth.database_uri == env["MLFLOW_AUTH_DATABASE_URI"], auth.database_uri  # "%" survived configparser
    assert auth.admin_username == "admin" and auth.admin_password is None and auth.default_permission == "READ"

    example = tmp_path / "example.ini"
    example.write_text((INFRA / "mlflow" / "basic_auth.ini.example").read_text())
    monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", str(example))
    assert read_auth_config().default_permission == "READ", "basic_auth.ini.example is not a valid auth config"


# -------------------------------------------------------------------------------------------- security
def test_no_recipe_binds_to_every_interface_without_authentication():
    checked = 0
    for path in recipe_files():
        code = code_text(path)
        docs = load_yaml_docs(path) if path.suffix in (".yaml", ".yml") else None
        binds = public_binds(code)
        checked += bool(_BIND.search(code))
        assert not binds or auth_on(code, docs), (
            f"{path.relative_to(REPO)} binds to every interface (or to a run-time address) without "
            f"authentication in the same recipe: {binds}")
    assert checked >= 3, "the scan found fewer bind settings than the recipes hold (ray, kuberay, mlflow)"


def test_ray_token_auth_wherever_ray_starts():
    starts = kuberay = 0
    for path in recipe_files():
        if path.suffix in (".yaml", ".yml"):
            docs = load_yaml_docs(path)
            for s in (n for n in walk(docs) if isinstance(n, str) and "ray start" in n):
                for segment in (seg for seg in s.split(";") if "ray start" in seg):
                    starts += 1
                    env, _ = _split_env_and_args(segment)
                    assert env.get("RAY_AUTH_MODE") == "token", f"{path.name}: {segment.strip()}"
            for doc in docs:
                if doc.get("apiVersion", "").startswith("ray.io/") and doc.get("kind") in ("RayJob", "RayCluster",
                                                                                          "RayService"):
                    kuberay += 1
                    cluster = doc["spec"].get("rayClusterSpec", doc["spec"])
                    via_env = all(any(e.get("name") == "RAY_AUTH_MODE" and e.get("value") == "token"
                                      for e in c.get("env", []))
                                  for pod in _pods({"spec": {"rayClusterSpec": cluster}}).values()
                                  for c in pod["containers"])
                    assert cluster.get("authOptions", {}).get("mode") == "token" or via_env, (
                        f"{path.name}: {doc['kind']} without token auth")
        else:
            for line in code_text(path).replace("\\\n", " ").splitlines():
                if "ray start" in line:
                    starts += 1
                    assert "RAY_AUTH_MODE=token" in line, f"{path.name}: ray start without token auth: {line}"
    assert starts >= 2 and kuberay >= 1, f"found {starts} `ray start` commands and {kuberay} KubeRay manifests"


def test_no_literal_secret_in_any_recipe():
    problems = {}
    for path in recipe_files():
        found = literal_secrets(path.read_text())
        for doc in load_yaml_docs(path) if path.suffix in (".yaml", ".yml") else []:
            for node in walk(doc):  # Kubernetes env: a secret's value comes from a Secret, not from the file
                if isinstance(node, dict) and "name" in node and "value" in node:
                    name = str(node["name"])
                    if re.search(r"(?i)(password|token|secret|_key)$", name) and not placeholder(str(node["value"])):
                        found.append(f"env {name} has a literal value (use valueFrom.secretKeyRef)")
        if found:
            problems[str(path.relative_to(REPO))] = found
    assert not problems, f"literal secrets in recipes: {problems}"
