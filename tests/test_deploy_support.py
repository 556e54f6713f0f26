"""Shared helpers of the deploy tests: finding (or installing) the tools that check deploy/,
reading PromQL out of the dashboard and the rules, and naming the metrics it uses.

The tools come from deploy/ci/install-tools.sh (pip, apt and npm, pinned). A test that
needs a tool which cannot be installed here skips, naming the tool and why. The tests at
the bottom hold the PromQL name extraction to known expressions.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
RULES = DEPLOY / "prometheus" / "rules" / "loopserve.rules.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "loopserve.json"
INSTALL_SCRIPT = DEPLOY / "ci" / "install-tools.sh"
TOOLS_DIR = Path(os.environ.get("LOOPSERVE_TOOLS_DIR")
                 or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
                 / "loopserve-deploy-tools")
PROMETHEUS_OPERATOR_MODELS = TOOLS_DIR / "node" / "node_modules" / "@kubernetes-models"
# Grafana's variables, replaced by values that keep each expression valid PromQL.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$model_name": ".*", "$instance": ".*"}
# metrics Prometheus itself makes for every target
PROMETHEUS_SYNTHETIC = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}


# ---------------------------------------------------------------------------- tools
@functools.lru_cache(maxsize=1)
def install_tools() -> str:
    """Run deploy/ci/install-tools.sh once per session; its log, for skip messages."""
    proc = subprocess.run(["bash", str(INSTALL_SCRIPT), sys.executable], capture_output=True,
                          text=True, timeout=600)
    return (proc.stdout + proc.stderr).strip()[-800:]


def find_tool(name: str) -> str | None:
    """The venv's own copy first (pinned by install-tools.sh), then PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else shutil.which(name)


def tool(name: str) -> str:
    """Path of a tool, installing the tool set if it is missing; skips if impossible."""
    path = find_tool(name)
    if path is None:
        log = install_tools()
        path = find_tool(name)
        if path is None:
            pytest.skip(f"{name} is not installed and deploy/ci/install-tools.sh could not "
                        f"install it here: {log or 'no output'}")
    return path


def python_tool(module: str):
    """Import a Python tool package, installing the tool set if it is missing."""
    try:
        return __import__(module)
    except ImportError:
        log = install_tools()
    try:
        return __import__(module)
    except ImportError:
        pytest.skip(f"python package {module} is not installed and "
                    f"deploy/ci/install-tools.sh could not install it: {log or 'no output'}")


def prometheus_operator_models() -> Path:
    """node_modules dir with @kubernetes-models/prometheus-operator (npm), or skip."""
    if not (PROMETHEUS_OPERATOR_MODELS / "prometheus-operator").is_dir():
        log = install_tools()
        if not (PROMETHEUS_OPERATOR_MODELS / "prometheus-operator").is_dir():
            pytest.skip("npm package @kubernetes-models/prometheus-operator is not installed "
                        f"and could not be: {log or 'no output'}")
    if shutil.which("node") is None:
        pytest.skip("node is not installed: cannot run the Prometheus Operator schemas")
    return TOOLS_DIR / "node"


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    kwargs.setdefault("timeout", 120)
    return subprocess.run(cmd, capture_output=True, text=True, **kwargs)


# ---------------------------------------------------------------------------- PromQL
AGGREGATION_CLAUSE = re.compile(
    r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool",
                   "and", "or", "unless", "offset", "inf", "nan"}


def substitute_grafana(expr: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    return expr


def promql_metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (functions, keywords, labels removed)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # label values may hold anything
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = AGGREGATION_CLAUSE.sub(" ", text)  # label lists after by/on/...
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges and subqueries
    names = set()
    for match in re.finditer(r"(?<![\w.])[A-Za-z_:][A-Za-z0-9_:]*", text):
        word = match.group()
        if text[match.end():].lstrip().startswith("("):
            continue  # a function or an aggregation
        if word.lower() not in PROMQL_KEYWORDS:
            names.add(word)
    return names


def dashboard_expressions(dashboard: dict) -> list[tuple[str, str]]:
    """(panel title, expression) for every target, Grafana variables substituted."""
    return [(panel["title"], substitute_grafana(target["expr"]))
            for panel in dashboard["panels"] for target in panel.get("targets", [])]


def dashboard_variable_metrics(dashboard: dict) -> set[str]:
    """Metrics the template variables read (`label_values(metric{...}, label)`)."""
    names = set()
    for variable in dashboard["templating"]["list"]:
        query = variable.get("query")
        query = query.get("query", "") if isinstance(query, dict) else str(query)
        names.update(re.findall(r"label_values\(\s*([A-Za-z_:][A-Za-z0-9_:]*)", query))
    return names


def load_rules() -> list[dict]:
    yaml = python_tool("yaml")
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"]
            for rule in group["rules"]]


def recorded_names() -> set[str]:
    return {rule["record"] for rule in load_rules() if "record" in rule}


def rule_expressions() -> list[tuple[str, str]]:
    return [(rule.get("record") or rule["alert"], rule["expr"]) for rule in load_rules()]


def load_dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def unknown_metrics(names: set[str], exported: set[str]) -> set[str]:
    """Names that are neither exported samples, recorded series, nor Prometheus' own."""
    return {name for name in names
            if name not in exported and name not in PROMETHEUS_SYNTHETIC
            and name not in recorded_names()}


# ---------------------------------------------------------------------------- tests
@pytest.mark.parametrize(("expr", "names"), [
    ('sum by (le) (rate(a_bucket{model_name=~"$m", x="by (z)"}[5m]))', {"a_bucket"}),
    ("histogram_quantile(0.99, sum by (model_name, le) (rate(b_bucket[5m])))", {"b_bucket"}),
    ("up == 0 or absent(up{job=\"loopserve\"})", {"up"}),
    ("x:y:rate5m / on (layer) group_left (bank) z_total offset 1h > 1e3",
     {"x:y:rate5m", "z_total"}),
    ("sum(rate(c_total[5m])) by (reason) > bool 0.5 and d unless e", {"c_total", "d", "e"}),
])
def test_promql_metric_names(expr, names):
    assert promql_metric_names(expr) == names


def test_grafana_variables_are_substituted():
    expr = substitute_grafana('rate(m{model_name=~"$model_name"}[$__rate_interval])')
    assert "$" not in expr
