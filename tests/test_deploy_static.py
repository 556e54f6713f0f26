"""Static checks of the deployment files, each by the tool that owns the format:

- Dockerfile: hadolint (with its ShellCheck of every RUN); the files it COPYs survive
  .dockerignore and build the loopserve wheel; its torch pin is the Makefile's.
- deploy/compose.yaml: the compose-spec JSON schema (bundled by check-jsonschema), and the
  wiring between the services and the files they mount.
- deploy/prometheus: `promtool check config`, `promtool check rules`, `promtool test rules`.
- deploy/grafana: the dashboard is what dashboard.py writes, its layout is sound, and each of
  its expressions parses as PromQL (promtool).
- deploy/k8s: rendered by `kubectl kustomize`, validated offline against the Kubernetes
  JSON schemas of 1.30 and 1.37 (kubernetes-validate, strict: unknown fields fail), the
  Prometheus Operator kinds against that operator's schemas, and the wiring between them.

That the metrics named here are the ones the server exports is checked against a live
server in tests/test_deploy_live.py.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import zipfile
from fnmatch import fnmatch
from pathlib import Path

import pytest

from tests.test_deploy_support import (
    DASHBOARD,
    DEPLOY,
    REPO,
    RULES,
    dashboard_expressions,
    load_dashboard,
    prometheus_operator_models,
    python_tool,
    run,
    tool,
)

KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")  # 1.30: the first with the preStop sleep handler


def load_yaml(path: Path):
    yaml = python_tool("yaml")
    return yaml.safe_load(path.read_text())


# ---------------------------------------------------------------------------- Dockerfile
def dockerfile() -> str:
    return (REPO / "Dockerfile").read_text()


def dockerfile_env() -> dict[str, str]:
    """The runtime stage's ENV values (the `KEY=value \\` continuation lines)."""
    return dict(re.findall(r"(LOOPSERVE_[A-Z_]+)=(\S+)", dockerfile().split("AS runtime")[1]))


def copy_sources(stage: str) -> list[str]:
    """Sources of the COPY lines of one stage (not COPY --from)."""
    text = dockerfile().split(f"AS {stage}\n")[1].split("\nFROM ")[0]
    sources = []
    for line in re.findall(r"^COPY (.+)$", text, flags=re.M):
        words = [w for w in line.split() if not w.startswith("--")]
        if "--from" not in line:
            sources += words[:-1]
    return sources


def docker_ignored(path: str, patterns: list[str]) -> bool:
    """.dockerignore semantics for plain and `**/` patterns: a path or any parent matches."""
    parts = Path(path.rstrip("/")).parts
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        bare = pattern.removeprefix("**/")
        for prefix in prefixes:
            if fnmatch(prefix, pattern) or (bare != pattern and fnmatch(Path(prefix).name, bare)):
                return True
    return False


def dockerignore_patterns() -> list[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    assert not any(p.startswith("!") for p in patterns), "negations need a real matcher"
    return patterns


def test_dockerfile_passes_hadolint():
    proc = run([tool("hadolint"), "--no-color", "--format", "json", str(REPO / "Dockerfile")])
    findings = json.loads(proc.stdout or "[]")
    assert findings == [], json.dumps(findings, indent=2)
    assert proc.returncode == 0, proc.stderr


def test_dockerfile_runs_loopserve_serve_as_non_root_with_healthcheck():
    text = dockerfile()
    runtime = text.split("AS runtime")[1]
    assert 'ENTRYPOINT ["loopserve", "serve"]' in runtime
    assert re.search(r"^USER \$\{UID\}$", runtime, flags=re.M)
    assert re.search(r"^ARG UID=(\d+)$", runtime, flags=re.M).group(1) != "0"
    assert re.search(r"^HEALTHCHECK .*\n.*/health", runtime, flags=re.M)
    assert f"EXPOSE {dockerfile_env()['LOOPSERVE_PORT']}" in runtime
    assert re.search(r"^ARG VARIANT=cuda$", text, flags=re.M)
    assert "FROM ${CUDA_BASE} AS base-cuda" in text and "FROM ${CPU_BASE} AS base-cpu" in text


def test_dockerfile_torch_pin_matches_makefile():
    makefile_pin = re.search(r"^TORCH \?= torch==(\S+)$", (REPO / "Makefile").read_text(),
                             flags=re.M).group(1)
    docker_pin = re.search(r"^ARG TORCH_VERSION=(\S+)$", dockerfile(), flags=re.M).group(1)
    assert docker_pin == makefile_pin


def test_docker_context_keeps_everything_the_dockerfile_copies():
    patterns = dockerignore_patterns()
    for source in copy_sources("build") + copy_sources("runtime"):
        assert not docker_ignored(source, patterns), f".dockerignore drops {source}"
    for dropped in ("tests", ".git", "runs", "deploy", ".venv-ci", "engine/__pycache__"):
        assert docker_ignored(dropped, patterns), f"{dropped} should stay out of the image"


def test_bundled_model_is_where_the_image_serves_it_from():
    model = dockerfile_env()["LOOPSERVE_MODEL"].removeprefix("/opt/loopserve/")
    assert "COPY --chown=root:root models/ /opt/loopserve/models/" in dockerfile()
    if not (REPO / model / "config.json").exists():
        pytest.skip(f"the bundled checkpoint {model}/ is not in the repo yet")
    assert (REPO / model / "model.safetensors").exists()


def test_build_stage_sources_build_the_wheel(tmp_path):
    """What the build stage copies is enough for `pip install .` (no stray imports)."""
    context = tmp_path / "context"
    for source in copy_sources("build"):
        src = REPO / source
        if src.is_dir():
            shutil.copytree(src, context / source, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            context.mkdir(exist_ok=True)
            shutil.copy(src, context / source)
    proc = run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                "--no-cache-dir", "-q", "-w", str(tmp_path / "wheel"), str(context)],
               timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    wheel = next((tmp_path / "wheel").glob("loopserve-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"loopserve_cli.py", "server/__init__.py", "engine/__init__.py"} <= names


# ---------------------------------------------------------------------------- compose
def compose() -> dict:
    return load_yaml(DEPLOY / "compose.yaml")


def test_compose_matches_the_compose_spec():
    proc = run([tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec",
                str(DEPLOY / "compose.yaml")])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_compose_wiring():
    services = compose()["services"]
    target = load_yaml(DEPLOY / "prometheus" / "prometheus.yml")["scrape_configs"][0]
    host, port = target["static_configs"][0]["targets"][0].split(":")
    for name, profile in (("loopserve-gpu", "gpu"), ("loopserve-cpu", "cpu")):
        service = services[name]
        assert service["profiles"] == [profile]
        assert host in service["networks"]["default"]["aliases"]
        assert service["ports"] == [f"{port}:{port}"]
        assert (DEPLOY / service["build"]["context"] / service["build"]["dockerfile"]).exists()
        drain = float(service["environment"]["LOOPSERVE_SHUTDOWN_TIMEOUT"]) + 5  # + grace
        assert float(service["stop_grace_period"].removesuffix("s")) > drain
    gpu = services["loopserve-gpu"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]
    assert services["loopserve-cpu"]["build"]["args"]["VARIANT"] == "cpu"
    for service in ("prometheus", "grafana"):
        for volume in services[service]["volumes"]:
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).is_dir(), f"{service} mounts missing {source}"


# ---------------------------------------------------------------------------- Prometheus
def test_prometheus_config_passes_promtool():
    proc = run([tool("promtool"), "check", "config", str(DEPLOY / "prometheus/prometheus.yml")])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "rules found" in proc.stdout  # the rule_files glob found the rules


def test_rules_pass_promtool_check_and_unit_tests():
    promtool = tool("promtool")
    proc = run([promtool, "check", "rules", str(RULES)])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    tests = DEPLOY / "prometheus" / "tests" / "loopserve.rules.test.yml"
    proc = run([promtool, "test", "rules", str(tests)])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_alert_has_a_unit_test():
    rules = load_yaml(RULES)
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    tests = load_yaml(DEPLOY / "prometheus" / "tests" / "loopserve.rules.test.yml")
    fired = {case["alertname"] for test in tests["tests"]
             for case in test.get("alert_rule_test", []) if case["exp_alerts"]}
    assert alerts == fired


# ---------------------------------------------------------------------------- Grafana
def load_module(path: Path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dashboard_json_is_what_dashboard_py_writes():
    module = load_module(DEPLOY / "grafana" / "dashboard.py")
    assert DASHBOARD.read_text() == module.render(), "run python deploy/grafana/dashboard.py"


def test_dashboard_has_the_panels_operators_need():
    dashboard = load_dashboard()
    titles = {p["title"] for p in dashboard["panels"]}
    assert {"Request rate", "Time to first token", "Inter-token latency", "End-to-end latency",
            "Running and waiting requests", "KV cache usage", "Mean loops per token",
            "Loops per layer", "Compute saved", "Memory-gate activity per layer",
            "Active tokens per loop step"} <= titles
    kinds = {p["title"]: p["type"] for p in dashboard["panels"]}
    assert kinds["Loops per layer"] == "heatmap"
    assert kinds["Active tokens per loop step"] == "heatmap"


def cells(panel: dict) -> set[tuple[int, int]]:
    g = panel["gridPos"]
    return {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}


def test_dashboard_layout_and_datasources():
    dashboard = load_dashboard()
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    taken: set[tuple[int, int]] = set()
    for panel in panels:
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["title"]
        assert not cells(panel) & taken, f"{panel['title']} overlaps another panel"
        taken |= cells(panel)
        for target in panel.get("targets", []):
            assert target["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    used = set(re.findall(r"\$(\w+)", json.dumps(panels))) - {"__rate_interval"}
    assert used <= variables


def test_dashboard_expressions_parse_as_promql(tmp_path):
    """promtool parses each expression (as a recording rule) after variable substitution."""
    rules = [{"record": f"dashboard:panel_{i}", "expr": expr}
             for i, (_, expr) in enumerate(dashboard_expressions(load_dashboard()))]
    path = tmp_path / "dashboard.rules.yml"
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))
    proc = run([tool("promtool"), "check", "rules", str(path)])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_grafana_provisioning_points_at_the_mounted_dashboards():
    datasource = load_yaml(DEPLOY / "grafana/provisioning/datasources/prometheus.yaml")
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"
    provider = load_yaml(DEPLOY / "grafana/provisioning/dashboards/loopserve.yaml")
    path = provider["providers"][0]["options"]["path"]
    mounts = dict(v.split(":")[:2] for v in compose()["services"]["grafana"]["volumes"])
    assert mounts["./grafana/dashboards"] == path


# ---------------------------------------------------------------------------- Kubernetes
@pytest.fixture(scope="module")
def k8s_docs() -> list[dict]:
    yaml = python_tool("yaml")
    proc = run([tool("kubectl"), "kustomize", str(DEPLOY / "k8s")])
    assert proc.returncode == 0, proc.stderr
    return list(yaml.safe_load_all(proc.stdout))


def by_kind(docs: list[dict]) -> dict[str, dict]:
    return {doc["kind"]: doc for doc in docs}


def test_kustomize_renders_every_resource(k8s_docs):
    assert sorted(by_kind(k8s_docs)) == sorted([
        "Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget",
        "ServiceMonitor", "PrometheusRule"])
    for doc in k8s_docs:
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "loopserve"


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_k8s_resources_match_kubernetes_schemas(k8s_docs, version):
    validator = python_tool("kubernetes_validate")
    for doc in k8s_docs:
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # not a Kubernetes kind: the operator's schemas check it below
        try:
            validator.validate(doc, version, strict=True)
        except validator.ValidationError as exc:
            pytest.fail(f"{doc['kind']} on Kubernetes {version}: {exc.message} at "
                        f"{'/'.join(map(str, exc.path))}")


def test_prometheus_operator_resources_match_their_schemas(k8s_docs):
    node_dir = prometheus_operator_models()
    operator_docs = [d for d in k8s_docs if d["apiVersion"].startswith("monitoring.coreos.com")]
    proc = subprocess.run(["node", str(DEPLOY / "ci" / "validate-crds.mjs"), str(node_dir)],
                          input=json.dumps(operator_docs), capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count(": valid") == len(operator_docs)


def test_prometheusrule_is_the_rules_file(k8s_docs):
    module = load_module(DEPLOY / "k8s" / "prometheusrule.py")
    assert (DEPLOY / "k8s/prometheusrule.yaml").read_text() == module.render(), \
        "run python deploy/k8s/prometheusrule.py"
    assert by_kind(k8s_docs)["PrometheusRule"]["spec"]["groups"] == load_yaml(RULES)["groups"]


def container(docs: list[dict]) -> dict:
    return by_kind(docs)["Deployment"]["spec"]["template"]["spec"]["containers"][0]


def test_deployment_asks_for_a_gpu_and_probes_health(k8s_docs):
    c = container(k8s_docs)
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    port_names = {p["name"] for p in c["ports"]}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"]["path"] == "/health"
        assert c[probe]["httpGet"]["port"] in port_names
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["LOOPSERVE_DEVICE"] == "cuda"
    assert c["ports"][0]["containerPort"] == int(dockerfile_env()["LOOPSERVE_PORT"])


def test_termination_outlasts_prestop_and_drain(k8s_docs):
    pod = by_kind(k8s_docs)["Deployment"]["spec"]["template"]["spec"]
    c = container(k8s_docs)
    env = {e["name"]: e.get("value") for e in c["env"]}
    pre_stop = c["lifecycle"]["preStop"]["sleep"]["seconds"]
    drain = float(env["LOOPSERVE_SHUTDOWN_TIMEOUT"]) + 5  # + the server's grace for writes
    assert pod["terminationGracePeriodSeconds"] > pre_stop + drain


def test_runs_as_the_image_user(k8s_docs):
    pod = by_kind(k8s_docs)["Deployment"]["spec"]["template"]["spec"]
    uid = int(re.search(r"^ARG UID=(\d+)$", dockerfile(), flags=re.M).group(1))
    assert pod["securityContext"]["runAsUser"] == uid
    assert pod["securityContext"]["runAsNonRoot"] is True


def test_selectors_ports_and_targets_line_up(k8s_docs):
    kinds = by_kind(k8s_docs)
    deployment = kinds["Deployment"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    selectors = [deployment["spec"]["selector"]["matchLabels"],
                 kinds["Service"]["spec"]["selector"],
                 kinds["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"]]
    for selector in selectors:
        assert selector.items() <= pod_labels.items()
    monitor = kinds["ServiceMonitor"]["spec"]
    assert monitor["selector"]["matchLabels"].items() <= kinds["Service"]["metadata"][
        "labels"].items()
    service_ports = {p["name"] for p in kinds["Service"]["spec"]["ports"]}
    assert {e["port"] for e in monitor["endpoints"]} <= service_ports
    assert kinds["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]["name"] == \
        deployment["metadata"]["name"]
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"


def test_hpa_scales_on_the_metric_the_adapter_serves(k8s_docs):
    hpa = by_kind(k8s_docs)["HorizontalPodAutoscaler"]["spec"]
    adapter = load_yaml(DEPLOY / "k8s" / "prometheus-adapter-values.yaml")
    served = {rule["name"]["as"] for rule in adapter["rules"]["custom"]}
    for metric in hpa["metrics"]:
        assert metric["type"] == "Pods"
        assert metric["pods"]["metric"]["name"] in served
