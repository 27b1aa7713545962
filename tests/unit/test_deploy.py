"""The deployment files stay valid and agree with the code and with each other.

What cannot run on a developer machine (``docker build``, a cluster) is checked by structure.
What can run does so when it is installed and skips otherwise: ``systemd-analyze verify`` and
``kubectl kustomize``; promtool is required where ``SAGA_REQUIRE_SERVICES=1`` (CI).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import re
import shlex
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric

from orchestrator.metrics import Metrics
from orchestrator.settings import Settings
from participants.metrics import ParticipantMetrics
from participants.settings import ParticipantSettings
from tests.conftest import unavailable

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
ALERT_TESTS = DEPLOY / "prometheus" / "alerts.test.yml"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "saga-orchestrator.json"
COMPOSE = DEPLOY / "compose.yaml"
DOCKERFILE = DEPLOY / "Dockerfile"
K8S = DEPLOY / "k8s"
SYSTEMD = DEPLOY / "systemd"
WORKFLOW = ROOT / ".github" / "workflows" / "ci.yml"

JOBS = {"saga-orchestrator", "saga-participant"}
SERVICES = ("inventory", "payment", "shipping", "notification")
IMAGE_UID = 10001

YAML_FILES = sorted(
    path
    for base in (DEPLOY, ROOT / ".github")
    for pattern in ("*.yml", "*.yaml")
    for path in base.rglob(pattern)
)


def load_yaml(path: Path) -> Any:
    """The single YAML document in ``path``."""
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def load_all_yaml(path: Path) -> list[Any]:
    """Every non-empty YAML document in ``path``."""
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc]


# --- PromQL: which metric names an expression reads ----------------------------------------

_STRINGS = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^}]*\}")
_RANGES = re.compile(r"\[[^\]]*\]")
_LABEL_LISTS = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
# Possessive, so that `rate(` is not read as the metric `rat` followed by `e(`.
_IDENTIFIER = re.compile(r"(?<![\w.:$])[A-Za-z_:][\w:]*+(?!\s*\()")
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring"}
_KEYWORDS |= {"group_left", "group_right", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (not functions, labels or keywords)."""
    text = _STRINGS.sub(" ", expr)
    text = _MATCHERS.sub(" ", text)
    text = _RANGES.sub(" ", text)
    text = _LABEL_LISTS.sub(" ", text)
    return {name for name in _IDENTIFIER.findall(text) if name.lower() not in _KEYWORDS}


def exported_names() -> set[str]:
    """Every series name the orchestrator and the participants expose, from metrics.py."""
    families: list[Metric] = []
    for metrics_class in (Metrics, ParticipantMetrics):
        # A registry each: the two classes both register the shared families (dead letters).
        registry = CollectorRegistry()
        metrics_class(registry)
        families += registry.collect()
    names: set[str] = set()
    for family in families:
        # prometheus_client names a counter family without its `_total` suffix.
        if family.type == "counter":
            names.add(f"{family.name}_total")
        elif family.type == "histogram":
            names |= {f"{family.name}{suffix}" for suffix in ("_bucket", "_sum", "_count")}
        else:
            names.add(family.name)
    return names


def alert_rules() -> list[dict[str, Any]]:
    """Every rule (alerting and recording) in alerts.yml."""
    return [rule for group in load_yaml(ALERTS)["groups"] for rule in group["rules"]]


def alerts() -> list[dict[str, Any]]:
    """The alerting rules in alerts.yml."""
    return [rule for rule in alert_rules() if "alert" in rule]


def dashboard_exprs() -> list[str]:
    """Every query expression of the dashboard, panels in rows included."""
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))

    def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for panel in items:
            yield panel
            yield from panels(panel.get("panels", []))

    exprs = [
        target["expr"]
        for panel in panels(dashboard["panels"])
        for target in panel.get("targets", [])
    ]
    # A variable's label_values(metric, label) reads a metric too.
    for variable in dashboard["templating"]["list"]:
        query = variable.get("definition", "")
        exprs += re.findall(r"label_values\(\s*([A-Za-z_:][\w:]*)\s*,", query)
    return exprs


def test_metric_names_reads_selectors_only() -> None:
    expr = (
        'histogram_quantile(0.99, sum without (instance, pod) (rate(saga_x_bucket{a="b"}[5m])))'
        " > 30 and on (job) up offset 15m unless saga_type:rec:sum * 1e3"
    )
    assert metric_names(expr) == {"saga_x_bucket", "up", "saga_type:rec:sum"}


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_yaml_file_loads(path: Path) -> None:
    assert load_all_yaml(path), f"{path} holds no YAML document"


def test_the_yaml_files_include_every_deliverable() -> None:
    relative = {str(path.relative_to(ROOT)) for path in YAML_FILES}
    assert {
        "deploy/compose.yaml",
        "deploy/prometheus/alerts.yml",
        "deploy/prometheus/alerts.test.yml",
        "deploy/prometheus/prometheus.yml",
        "deploy/k8s/kustomization.yaml",
        ".github/workflows/ci.yml",
    } <= relative


# --- Alerts ---------------------------------------------------------------------------------


def test_alerts_read_only_metrics_that_exist() -> None:
    known = exported_names() | {"up"} | {r["record"] for r in alert_rules() if "record" in r}
    seen: set[str] = set()
    for rule in alert_rules():
        names = metric_names(rule["expr"])
        unknown = names - known
        assert not unknown, f"{rule.get('alert') or rule['record']} reads unknown {unknown}"
        seen |= names
    # The parser found what the rules are about, so the check above is not vacuous.
    assert {"saga_active", "saga_step_outcomes_total", "up"} <= seen


def test_every_alert_says_what_it_means_and_what_to_do() -> None:
    for rule in alerts():
        name = rule["alert"]
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        annotations = rule["annotations"]
        for key in ("summary", "description", "runbook"):
            assert annotations.get(key, "").strip(), f"{name} has no {key}"
        assert "\n" not in annotations["runbook"], f"{name}: the runbook is one line"
        assert "threshold" in annotations["description"], f"{name} does not name its threshold"


def test_every_alert_has_a_firing_and_a_quiet_test() -> None:
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in load_yaml(ALERT_TESTS)["tests"]:
        for check in case.get("alert_rule_test", []):
            (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = {rule["alert"] for rule in alerts()}
    assert names - firing == set(), "alerts never shown to fire"
    assert names - quiet == set(), "alerts never shown to stay quiet"
    assert (firing | quiet) - names == set(), "tests for alerts that do not exist"


def test_alerts_name_the_scrape_jobs_that_exist() -> None:
    config = load_yaml(PROMETHEUS_CONFIG)
    jobs = {job["job_name"] for job in config["scrape_configs"]}
    assert jobs >= JOBS
    for rule in alerts():
        for job in re.findall(r'job="([^"]+)"', rule["expr"]):
            assert job in jobs, f"{rule['alert']} names job {job!r}, which nothing scrapes"


def test_prometheus_loads_the_alert_rules_and_scrapes_every_compose_service() -> None:
    config = load_yaml(PROMETHEUS_CONFIG)
    assert config["rule_files"] == ["alerts.yml"]
    targets = {
        target.split(":")[0]
        for job in config["scrape_configs"]
        if job["job_name"] in JOBS
        for static in job["static_configs"]
        for target in static["targets"]
    }
    assert targets == {"orchestrator", *SERVICES}
    assert targets <= set(load_yaml(COMPOSE)["services"])


def test_prometheusrule_is_rendered_from_alerts_yml() -> None:
    spec = importlib.util.spec_from_file_location("render", DEPLOY / "render_prometheusrule.py")
    assert spec is not None
    assert spec.loader is not None
    render = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(render)
    manifest = K8S / "prometheusrule.yaml"
    expected = render.render(ALERTS.read_text(encoding="utf-8"))
    assert manifest.read_text(encoding="utf-8") == expected, (
        "deploy/k8s/prometheusrule.yaml is out of date: run python deploy/render_prometheusrule.py"
    )
    document = load_yaml(manifest)
    assert document["kind"] == "PrometheusRule"
    assert document["spec"] == load_yaml(ALERTS)


# --- Grafana --------------------------------------------------------------------------------


def test_dashboard_reads_only_metrics_that_exist() -> None:
    known = exported_names() | {"up"}
    exprs = dashboard_exprs()
    seen: set[str] = set()
    for expr in exprs:
        names = metric_names(expr)
        assert not names - known, f"{expr!r} reads unknown {names - known}"
        seen |= names
    # The panels an operator looks for are all there.
    assert {
        "saga_started_total",
        "saga_completed_total",
        "saga_failed_total",
        "saga_active",
        "saga_step_duration_seconds_bucket",
        "saga_step_outcomes_total",
        "saga_compensations_total",
        "saga_step_retries_total",
        "saga_late_replies_total",
        "saga_outbox_backlog",
        "saga_outbox_oldest_age_seconds",
        "saga_timer_lateness_seconds_bucket",
        "saga_dead_lettered_total",
        "saga_publish_failures_total",
    } <= seen


@pytest.mark.prometheus
def test_dashboard_queries_parse(tmp_path: Path) -> None:
    # promtool parses PromQL offline when the queries are written as recording rules.
    promtool = shutil.which("promtool")
    if promtool is None:
        unavailable("promtool", "not installed (Debian package: prometheus)")
    rules = [
        {
            "record": f"dashboard:query_{index}",
            "expr": expr.replace("$__rate_interval", "1m").replace("$saga_type", ".*"),
        }
        for index, expr in enumerate(dashboard_exprs())
    ]
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_grafana_provisioning_matches_compose() -> None:
    datasource = load_yaml(DEPLOY / "grafana/provisioning/datasources/prometheus.yml")
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"
    provider = load_yaml(DEPLOY / "grafana/provisioning/dashboards/saga.yml")
    grafana = load_yaml(COMPOSE)["services"]["grafana"]
    mounts = {volume.split(":")[1]: volume.split(":")[0] for volume in grafana["volumes"]}
    dashboards_dir = provider["providers"][0]["options"]["path"]
    assert (DEPLOY / mounts[dashboards_dir] / DASHBOARD.name).is_file()
    assert (DEPLOY / mounts["/etc/grafana/provisioning"]).is_dir()


# --- promtool -------------------------------------------------------------------------------


@pytest.mark.prometheus
@pytest.mark.parametrize(
    "args",
    [
        ["check", "rules", str(ALERTS)],
        ["test", "rules", str(ALERT_TESTS)],
        ["check", "config", str(PROMETHEUS_CONFIG)],
    ],
    ids=["check-rules", "test-rules", "check-config"],
)
def test_promtool(args: list[str]) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        unavailable("promtool", "not installed (Debian package: prometheus)")
    result = subprocess.run([promtool, *args], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


# --- The saga processes: compose, k8s, systemd all start real apps with real settings -------


def assert_app_exists(reference: str) -> None:
    """``module:attribute`` names an object the CLI can load."""
    module, _, attribute = reference.partition(":")
    assert hasattr(importlib.import_module(module), attribute), f"{reference} does not exist"


def assert_known_settings(names: set[str]) -> None:
    """Every SAGA_* variable is one the settings read (a typo would be silently ignored)."""
    fields = {
        f"SAGA_{field.upper()}"
        for model in (Settings, ParticipantSettings)
        for field in model.model_fields
    }
    unknown = {name for name in names if name.startswith("SAGA_")} - fields
    assert not unknown, f"settings that do not exist: {unknown}"


def test_compose_wires_every_saga_process() -> None:
    services = load_yaml(COMPOSE)["services"]
    assert services["rabbitmq"]["image"].startswith("rabbitmq:3.13-management")
    assert services["mongodb"]["image"].startswith("mongo:7")
    mongo = services["mongodb"]
    assert "--replSet" in mongo["command"]
    assert "rs.initiate" in " ".join(mongo["healthcheck"]["test"])
    assert "healthcheck" in services["rabbitmq"]

    saga = {name: services[name] for name in ("orchestrator", *SERVICES)}
    for name, service in saga.items():
        role, flag, app = service["command"]
        assert role == ("orchestrator" if name == "orchestrator" else "participant")
        assert flag == "--app"
        assert_app_exists(app)
        env = service["environment"]
        assert_known_settings(set(env))
        assert env["SAGA_AMQP_URL"].startswith("amqp://")
        # The probes listen on 127.0.0.1 by default: a container must serve them to its peers.
        assert env["SAGA_HTTP_HOST"] == "0.0.0.0"
        assert {
            "SAGA_HTTP_PORT",
            "SAGA_LOG_FORMAT",
            "SAGA_LOG_LEVEL",
            "SAGA_QUEUE_TYPE",
        } <= env.keys()
        assert service["build"]["dockerfile"] == "deploy/Dockerfile"
        assert service["stop_grace_period"] == "30s"
        for dependency in ("rabbitmq", "mongodb"):
            assert service["depends_on"][dependency]["condition"] == "service_healthy"
        if name == "orchestrator":
            assert "replicaSet=rs0" in env["SAGA_STORE_URL"]
            # The timeouts must name real saga steps: the orchestrator refuses others.
            app_object = importlib.import_module("examples.order_fulfillment").app
            app_object.with_step_timeouts(json.loads(env["SAGA_STEP_TIMEOUTS"]))
        else:
            assert "replicaSet=rs0" in env["SAGA_IDEMPOTENCY_URL"]

    assert services["grafana"]["depends_on"]["prometheus"]["condition"] == "service_healthy"
    for name in ("prometheus", "grafana"):
        for volume in services[name]["volumes"]:
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (DEPLOY / source).exists(), f"{name} mounts missing {source}"


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text(encoding="utf-8"))
    instructions = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            keyword, _, rest = stripped.partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
    return instructions


def test_dockerfile_is_multi_stage_small_and_non_root() -> None:
    instructions = dockerfile_instructions()
    stages = [i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM"]
    assert len(stages) >= 2, "a build stage and a runtime stage"
    args = dict(a.split("=", 1) for k, a in instructions if k == "ARG" and "=" in a)
    assert args["PYTHON_IMAGE"].startswith("python:3.11-slim")
    final = instructions[stages[-1] :]
    keywords = [keyword for keyword, _ in final]

    user = [a for k, a in final if k == "USER"]
    assert user, "the runtime stage sets USER"
    uid = user[-1].split(":")[0]
    assert uid.isdigit(), "a numeric USER, so that runAsNonRoot can check it"
    assert int(uid) == IMAGE_UID != 0
    assert keywords.index("USER") < keywords.index("ENTRYPOINT")

    assert json.loads(dict(final)["ENTRYPOINT"]) == ["saga"]
    healthcheck = dict(final)["HEALTHCHECK"]
    assert "/healthz" in healthcheck
    assert "urllib" in healthcheck
    runs = " ".join(a for k, a in final if k == "RUN")
    for tool in ("gcc", "build-essential", "apt-get install", "pip install"):
        assert tool not in runs, f"the runtime stage installs {tool}"
    copies = [a for k, a in final if k == "COPY"]
    assert all(c.startswith("--from=") for c in copies), "the runtime stage copies built files only"


def test_dockerfile_copies_everything_pip_install_reads() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    needed = {"pyproject.toml", pyproject["project"]["readme"]}
    needed |= set(pyproject["tool"]["setuptools"]["packages"]["find"]["include"])
    needed = {name.rstrip("*") for name in needed}
    copied: set[str] = set()
    for keyword, args in dockerfile_instructions():
        if keyword == "COPY" and not args.startswith("--from="):
            copied |= {source.rstrip("/") for source in shlex.split(args)[:-1]}
    assert needed <= copied
    # .dockerignore ignores everything and admits exactly what the build copies.
    ignore = (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
    admitted = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert "*" in ignore
    assert admitted == copied


def k8s_documents() -> list[dict[str, Any]]:
    """Every manifest the kustomization lists."""
    kustomization = load_yaml(K8S / "kustomization.yaml")
    return [doc for name in kustomization["resources"] for doc in load_all_yaml(K8S / name)]


def test_kustomization_lists_every_manifest() -> None:
    listed = set(load_yaml(K8S / "kustomization.yaml")["resources"])
    present = {path.name for path in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present


def test_k8s_deployments_are_probed_limited_and_non_root() -> None:
    documents = k8s_documents()
    deployments = {d["metadata"]["name"]: d for d in documents if d["kind"] == "Deployment"}
    assert set(deployments) == {"saga-orchestrator", *(f"saga-{s}" for s in SERVICES)}
    assert deployments["saga-orchestrator"]["spec"]["replicas"] == 2
    secret_keys = {
        key
        for d in documents
        if d["kind"] == "Secret"
        for key in {**d.get("data", {}), **d.get("stringData", {})}
    }
    config = load_yaml(K8S / "kustomization.yaml")["configMapGenerator"][0]
    assert_known_settings({literal.split("=")[0] for literal in config["literals"]})
    # The probes listen on 127.0.0.1 by default; the kubelet probes the pod's address.
    assert "SAGA_HTTP_HOST=0.0.0.0" in config["literals"]

    for name, deployment in deployments.items():
        template = deployment["spec"]["template"]
        labels = template["metadata"]["labels"]
        assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
        assert labels["app.kubernetes.io/name"] in JOBS
        assert template["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
        pod = template["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == IMAGE_UID
        assert pod["terminationGracePeriodSeconds"] >= 30
        (container,) = pod["containers"]
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        ports = {port["name"]: port["containerPort"] for port in container["ports"]}
        assert ports == {"metrics": 9400}
        assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
        assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(container["resources"][kind]), f"{name} {kind}"
        role, flag, app = container["args"]
        assert role == ("orchestrator" if name == "saga-orchestrator" else "participant")
        assert flag == "--app"
        assert_app_exists(app)
        assert container["envFrom"] == [{"configMapRef": {"name": config["name"]}}]
        env = {item["name"]: item["valueFrom"]["secretKeyRef"] for item in container["env"]}
        assert_known_settings(set(env))
        assert {ref["key"] for ref in env.values()} <= secret_keys
        assert {ref["name"] for ref in env.values()} == {"saga-urls"}


def test_k8s_services_podmonitor_and_rules_select_the_pods() -> None:
    documents = k8s_documents()
    pod_labels = [
        d["spec"]["template"]["metadata"]["labels"] for d in documents if d["kind"] == "Deployment"
    ]
    services = [d for d in documents if d["kind"] == "Service"]
    assert len(services) == len(pod_labels)
    for service in services:
        selector = service["spec"]["selector"].items()
        assert sum(selector <= labels.items() for labels in pod_labels) == 1
        assert service["spec"]["ports"][0]["targetPort"] == "metrics"
    (monitor,) = [d for d in documents if d["kind"] == "PodMonitor"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    selector = monitor["spec"]["selector"]["matchLabels"].items()
    assert all(selector <= labels.items() for labels in pod_labels)
    # The job label comes from a pod label whose values are the jobs the alerts name.
    assert {labels[monitor["spec"]["jobLabel"]] for labels in pod_labels} == JOBS
    assert monitor["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    assert [d["kind"] for d in documents].count("PrometheusRule") == 1


def test_kustomize_builds() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed")
    result = subprocess.run(
        [kubectl, "kustomize", str(K8S)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    kinds = [doc["kind"] for doc in yaml.safe_load_all(result.stdout) if doc]
    assert {"Deployment", "Service", "ConfigMap", "Secret", "PodMonitor", "PrometheusRule"} <= set(
        kinds
    )


# --- systemd --------------------------------------------------------------------------------


def unit_settings(path: Path) -> dict[str, list[str]]:
    """Every Key=value of a unit file, keys repeated as often as they appear."""
    settings: dict[str, list[str]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if "=" in line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


@pytest.mark.parametrize(
    ("unit", "environment_file", "role"),
    [
        ("saga-orchestrator.service", "/etc/saga/orchestrator.env", "orchestrator"),
        ("saga-participant@.service", "/etc/saga/participant-%i.env", "participant"),
    ],
)
def test_systemd_unit_is_a_hardened_daemon(unit: str, environment_file: str, role: str) -> None:
    settings = unit_settings(SYSTEMD / unit)
    (exec_start,) = settings["ExecStart"]
    assert shlex.split(exec_start)[:2] == ["/opt/saga/bin/saga", role]
    assert settings["User"] != ["root"]
    assert environment_file in settings["EnvironmentFile"]
    expected = {
        "Restart": "on-failure",
        "KillSignal": "SIGTERM",
        "TimeoutStopSec": "30s",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "WantedBy": "multi-user.target",
    }
    for key, value in expected.items():
        assert settings.get(key) == [value], key
    defaults = dict(item.split("=", 1) for item in settings["Environment"])
    if "SAGA_APP" in defaults:
        assert_app_exists(defaults["SAGA_APP"])
    else:
        for service in SERVICES:
            assert_app_exists(f"{defaults['PARTICIPANT_MODULE']}:{service}")


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    # verify insists the ExecStart binary exists: check copies that run an existing one instead.
    stand_in = shutil.which("true") or "/bin/true"
    control = tmp_path / "saga-control.service"
    control.write_text(f"[Service]\nExecStart={stand_in}\n")
    probe = subprocess.run(
        [analyze, "verify", str(control)], capture_output=True, text=True, check=False
    )
    if probe.returncode != 0:
        pytest.skip(f"systemd-analyze verify does not work here: {probe.stderr.strip()}")
    units = sorted(SYSTEMD.glob("*.service"))
    assert len(units) == 2
    for unit in units:
        copy = tmp_path / unit.name
        copy.write_text(unit.read_text(encoding="utf-8").replace("/opt/saga/bin/saga", stand_in))
        result = subprocess.run(
            [analyze, "verify", str(copy)], capture_output=True, text=True, check=False
        )
        # verify exits 0 on unknown keys and bad values, so its messages count as failures.
        messages = [line for line in result.stderr.splitlines() if copy.stem in line]
        assert result.returncode == 0, result.stderr
        assert not messages, "\n".join(messages)


# --- CI -------------------------------------------------------------------------------------


def test_ci_workflow_runs_the_suite_against_real_services() -> None:
    workflow = load_yaml(WORKFLOW)
    # PyYAML reads the bare key `on` as the boolean True.
    assert "pull_request" in workflow[True]
    job = workflow["jobs"]["test"]
    assert job["runs-on"].startswith("ubuntu")
    assert {"rabbitmq", "postgres"} <= set(job["services"])
    env = job["env"]
    assert env["SAGA_REQUIRE_SERVICES"] == "1"
    assert env["SAGA_TEST_AMQP_URL"].startswith("amqp://")
    assert env["SAGA_TEST_POSTGRES_URL"].startswith("postgresql://")
    assert "replicaSet=rs0" in env["SAGA_TEST_MONGO_URL"]
    assert "directConnection=true" in env["SAGA_TEST_MONGO_URL"]
    steps = job["steps"]
    python = [s for s in steps if s.get("uses", "").startswith("actions/setup-python")]
    assert python[0]["with"]["python-version"] == "3.11"
    runs = "\n".join(step.get("run", "") for step in steps)
    assert "--replSet rs0" in runs
    assert "rs.initiate" in runs
    assert "apt-get install" in runs
    assert "prometheus" in runs
    assert runs.rstrip().endswith("./scripts/test")
