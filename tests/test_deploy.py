"""deploy/: files parse, the mounted profile validates, names and ports agree."""

import yaml

from tests.deploy_files import DEPLOY, dashboard, dashboard_metric_names, k8s_objects
from vllm_kvplug.profiles import check_implemented
from vllm_kvplug.profiles.loader import ResolvedProfile, parse_profile_text


def test_kubernetes_objects_fit_together():
    objs = k8s_objects()
    assert set(objs) == {"ConfigMap", "Deployment", "Service"}
    dep, svc, cm = objs["Deployment"], objs["Service"], objs["ConfigMap"]
    pod = dep["spec"]["template"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert svc["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    (container,) = pod["spec"]["containers"]
    args = container["args"]
    profile_path = args[args.index("--kv-compression") + 1]
    mount = next(m for m in container["volumeMounts"] if m["name"] == "profile")
    volume = next(v for v in pod["spec"]["volumes"] if v["name"] == "profile")
    assert volume["configMap"]["name"] == cm["metadata"]["name"]
    assert profile_path == f"{mount['mountPath']}/profile.yaml"
    port = int(args[args.index("--port") + 1])
    assert container["ports"][0]["containerPort"] == port
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(port)
    assert svc["spec"]["ports"][0]["port"] == port


def test_mounted_profile_validates_and_is_servable():
    text = k8s_objects()["ConfigMap"]["data"]["profile.yaml"]
    profile = parse_profile_text(text, "deploy/kubernetes/configmap-profile.yaml")
    check_implemented(ResolvedProfile(profile, "configmap"))


def test_prometheus_scrapes_the_service():
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    svc = k8s_objects()["Service"]
    expected = f"{svc['metadata']['name']}:{svc['spec']['ports'][0]['port']}"
    assert job["static_configs"][0]["targets"] == [expected]


def test_dashboard_shape():
    d = dashboard()
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    for p in d["panels"]:
        assert p["targets"] and all(t["expr"].strip() for t in p["targets"])
    names = dashboard_metric_names()
    assert {"kvplug_profile_info", "kvplug_kv_cache_bytes_per_token",
            "kvplug_kv_cache_compression_ratio"} <= names
