"""Readers for the files in deploy/ (shared by the static and the end-to-end tests)."""

import json
import re
from pathlib import Path

import yaml

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
METRIC_NAME = re.compile(r"\b(?:vllm:[a-z_:]+|kvplug_[a-z_]+)")


def k8s_objects() -> dict[str, dict]:
    objects = {}
    for path in sorted((DEPLOY / "kubernetes").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            objects[doc["kind"]] = doc
    return objects


def dashboard() -> dict:
    return json.loads((DEPLOY / "grafana" / "vllm-kvplug.json").read_text())


def dashboard_metric_names() -> set[str]:
    """Every metric name that a panel query or template variable of the dashboard uses."""
    d = dashboard()
    exprs = [t["expr"] for p in d["panels"] for t in p["targets"]]
    exprs += [v["query"] for v in d["templating"]["list"] if v["type"] == "query"]
    return {name for e in exprs for name in METRIC_NAME.findall(e)}


def exposed_names(exposition: str) -> set[str]:
    """Sample names in a Prometheus text exposition (histograms as _bucket/_sum/_count)."""
    return {line.split("{")[0].split(" ")[0] for line in exposition.splitlines()
            if line and not line.startswith("#")}
