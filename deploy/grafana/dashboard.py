"""Builds the loopserve Grafana dashboard (deploy/grafana/dashboards/loopserve.json).

The dashboard is code so that panels stay uniform and every PromQL expression sits in one
readable list; tests check that the committed JSON is what this script writes and that
every metric it names is one the server exports. Regenerate after an edit:

    python deploy/grafana/dashboard.py

Queries use raw metrics (not the recording rules), so the dashboard works on any
Prometheus that scrapes loopserve, rules loaded or not.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

OUT = Path(__file__).parent / "dashboards" / "loopserve.json"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
SEL = 'model_name=~"$model_name", instance=~"$instance"'
RATE = "$__rate_interval"


def rate(metric: str, by: str = "") -> str:
    grouping = f" by ({by})" if by else ""
    return f"sum{grouping} (rate({metric}{{{SEL}}}[{RATE}]))"


def quantiles(histogram: str, qs=(0.5, 0.9, 0.99)) -> list[tuple[str, str]]:
    """One histogram_quantile target per quantile, over all selected instances."""
    buckets = rate(f"{histogram}_bucket", by="le")
    return [(f"histogram_quantile({q}, {buckets})", f"p{round(q * 100)}") for q in qs]


def mean(histogram: str, by: str = "") -> str:
    """Mean observation of a histogram: rate of its sum over rate of its count."""
    return f"{rate(f'{histogram}_sum', by)} / {rate(f'{histogram}_count', by)}"


def target(expr: str, legend: str, ref: str, fmt: str = "time_series") -> dict:
    return {"datasource": DATASOURCE, "expr": expr, "legendFormat": legend,
            "refId": ref, "format": fmt, "range": True}


def panel(title: str, targets: list[tuple[str, str]], unit: str, grid: tuple, *,
          kind: str = "timeseries", description: str = "", fmt: str = "time_series",
          options: dict | None = None, field_defaults: dict | None = None) -> dict:
    x, y, w, h = grid
    refs = "ABCDEFGH"
    return {
        "type": kind, "title": title, "description": description, "datasource": DATASOURCE,
        "gridPos": {"x": x, "y": y, "w": w, "h": h},
        "targets": [target(e, legend, refs[i], fmt) for i, (e, legend) in enumerate(targets)],
        "fieldConfig": {"defaults": {"unit": unit, **(field_defaults or {})}, "overrides": []},
        "options": options or {"legend": {"displayMode": "list", "placement": "bottom"},
                               "tooltip": {"mode": "multi", "sort": "desc"}},
    }


def heatmap(title: str, expr: str, legend: str, unit: str, grid: tuple, *,
            description: str, fmt: str) -> dict:
    """A heatmap of pre-bucketed rows (no calculation in Grafana): one row per series."""
    options = {
        "calculate": False,
        "yAxis": {"axisPlacement": "left", "unit": unit},
        "rowsFrame": {"layout": "auto"},
        "color": {"mode": "scheme", "scheme": "Oranges", "steps": 64},
        "cellGap": 1,
        "tooltip": {"mode": "single", "yHistogram": False},
        "legend": {"show": True},
    }
    return panel(title, [(expr, legend)], "short", grid, kind="heatmap",
                 description=description, fmt=fmt, options=options)


def row(title: str, y: int) -> dict:
    return {"type": "row", "title": title, "collapsed": False, "panels": [],
            "gridPos": {"x": 0, "y": y, "w": 24, "h": 1}}


def traffic_panels(y: int) -> list[dict]:
    requests = [
        (rate("loopserve_request_success_total", "finished_reason"), "{{finished_reason}}"),
        (rate("loopserve_request_failure_total", "reason"), "failed: {{reason}}"),
    ]
    tokens = [(rate("loopserve_prompt_tokens_total"), "prompt"),
              (rate("loopserve_generation_tokens_total"), "generated")]
    return [
        row("Traffic and latency", y),
        panel("Request rate", requests, "reqps", (0, y + 1, 8, 8),
              description="Finished requests per second, by finish reason; failures by reason."),
        panel("Token throughput", tokens, "short", (8, y + 1, 8, 8),
              description="Prompt and generated tokens per second."),
        panel("Queue time", quantiles("loopserve_request_queue_time_seconds"), "s",
              (16, y + 1, 8, 8), description="Time from arrival to first scheduling."),
        panel("Time to first token", quantiles("loopserve_time_to_first_token_seconds"), "s",
              (0, y + 9, 8, 8)),
        panel("Inter-token latency", quantiles("loopserve_inter_token_latency_seconds"), "s",
              (8, y + 9, 8, 8)),
        panel("End-to-end latency", quantiles("loopserve_e2e_request_latency_seconds"), "s",
              (16, y + 9, 8, 8)),
    ]


def engine_panels(y: int) -> list[dict]:
    queue = [(f"sum(loopserve_num_requests_running{{{SEL}}})", "running"),
             (f"sum(loopserve_num_requests_waiting{{{SEL}}})", "waiting")]
    kv = [(f"loopserve_kv_cache_usage_ratio{{{SEL}}}", "{{instance}}")]
    hits = rate("loopserve_prefix_cache_hits_total")
    queries = rate("loopserve_prefix_cache_queries_total")
    cache = [(f"{hits} / {queries}", "prefix cache hit ratio")]
    preemptions = [(rate("loopserve_num_preemptions_total"), "preemptions")]
    return [
        row("Engine", y),
        panel("Running and waiting requests", queue, "short", (0, y + 1, 8, 8),
              description="The HorizontalPodAutoscaler scales on the waiting queue."),
        panel("KV cache usage", kv, "percentunit", (8, y + 1, 6, 8),
              field_defaults={"min": 0, "max": 1}),
        panel("Prefix cache hit ratio", cache, "percentunit", (14, y + 1, 5, 8),
              field_defaults={"min": 0, "max": 1}),
        panel("Preemptions", preemptions, "ops", (19, y + 1, 5, 8)),
    ]


def loop_panels(y: int) -> list[dict]:
    loops = "loopserve_request_mean_loops_per_token"
    mean_loops = [(mean(loops), "mean"), *quantiles(loops, (0.1, 0.5, 0.9))]
    per_layer = (f"{rate('loopserve_layer_loop_iterations_total', 'layer')}"
                 f" / {rate('loopserve_layer_tokens_total', 'layer')}")
    saved = "loopserve_request_compute_saved_ratio"
    gate = [(f"avg by (layer, bank) (loopserve_layer_memory_gate{{{SEL}}})",
             "layer {{layer}} {{bank}}")]
    active = rate("loopserve_loop_step_active_tokens_bucket", "le")
    return [
        row("Loops: adaptive depth and memory", y),
        panel("Mean loops per token", mean_loops, "short", (0, y + 1, 8, 8),
              description="Each request reports its mean loops per token; mean and "
                          "quantiles over the requests that finished."),
        heatmap("Loops per layer", per_layer, "{{layer}}", "short", (8, y + 1, 8, 8),
                fmt="time_series",
                description="Mean loops per token in each layer (loop iterations / tokens): "
                            "one row per layer, colour = mean loops."),
        panel("Compute saved", [(mean(saved), "mean"), *quantiles(saved, (0.5,))],
              "percentunit", (16, y + 1, 8, 8), field_defaults={"min": 0, "max": 1},
              description="1 - FLOPs spent / FLOPs at max depth, per request."),
        panel("Memory-gate activity per layer", gate, "short", (0, y + 9, 8, 8),
              description="Mean sigmoid gate of each memory bank, by layer."),
        heatmap("Active tokens per loop step", active, "{{le}}", "short", (8, y + 9, 8, 8),
                fmt="heatmap",
                description="Batch size of each (layer, step) call: how tokens regroup as "
                            "they halt."),
        panel("FLOPs spent", [(rate("loopserve_request_flops_sum"), "FLOP/s")], "short",
              (16, y + 9, 8, 8), description="FLOPs per second spent by finished requests."),
    ]


def variables() -> list[dict]:
    def query(name: str, expr: str) -> dict:
        return {"name": name, "label": name, "type": "query", "datasource": DATASOURCE,
                "query": {"query": expr, "refId": name}, "definition": expr,
                "refresh": 2, "includeAll": True, "multi": True, "allValue": ".*",
                "current": {"text": "All", "value": "$__all"}, "sort": 1}

    source = {"name": "datasource", "label": "Prometheus", "type": "datasource",
              "query": "prometheus", "current": {}, "refresh": 1}
    return [source,
            query("model_name", "label_values(loopserve_num_requests_running, model_name)"),
            query("instance", 'label_values(loopserve_num_requests_running'
                              '{model_name=~"$model_name"}, instance)')]


def dashboard() -> dict:
    panels = [*traffic_panels(0), *engine_panels(17), *loop_panels(26)]
    for i, p in enumerate(panels, start=1):
        p["id"] = i
    return {
        "uid": "loopserve", "title": "loopserve", "tags": ["loopserve", "llm-serving"],
        "description": "loopserve: traffic, latency, engine state, and where the loops go.",
        "editable": True, "graphTooltip": 1, "schemaVersion": 39, "version": 1,
        "refresh": "10s", "time": {"from": "now-1h", "to": "now"}, "timezone": "",
        "templating": {"list": variables()}, "annotations": {"list": []},
        "links": [], "panels": panels,
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


def main() -> int:
    OUT.write_text(render())
    print(f"wrote {OUT}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
