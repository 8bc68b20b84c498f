"""deploy/: the Kubernetes manifests validate against the Kubernetes schemas offline
(kubernetes-validate bundles them), the pieces refer to each other consistently, and the
docker-compose file mounts files that exist."""
import os
import shutil
import subprocess
import sys

import pytest

yaml = pytest.importorskip("yaml")

ROOT = os.path.join(os.path.dirname(__file__), "..")
DEPLOY = os.path.join(ROOT, "deploy")
K8S = os.path.join(DEPLOY, "k8s")


def load(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def manifests(folder=K8S):
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".yaml"))


REPLICAS = os.path.join(K8S, "replicas")


def test_kubernetes_manifests_validate_against_the_schemas():
    exe = shutil.which("kubernetes-validate") or os.path.join(os.path.dirname(sys.executable), "kubernetes-validate")
    if not os.path.exists(exe):
        if os.environ.get("CI"):
            pytest.fail("kubernetes-validate is not installed (pip install kubernetes-validate)")
        pytest.skip("kubernetes-validate is not installed")
    every = manifests() + manifests(REPLICAS)
    for version in ["1.31.0", "1.37.0"]:
        r = subprocess.run([exe, "--strict", "-k", version, *every], capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr
        for m in every:
            if not m.endswith("servicemonitor.yaml"):
                assert f"{m} passed" in r.stdout, (m, r.stdout)


def test_manifests_fit_together():
    docs = {d["kind"]: d for m in manifests() for d in load(m)}
    dep, svc, pvc, mon = docs["Deployment"], docs["Service"], docs["PersistentVolumeClaim"], docs["ServiceMonitor"]
    pod = dep["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert svc["spec"]["selector"].items() <= labels.items()
    c = pod["spec"]["containers"][0]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    for probe in ["readinessProbe", "livenessProbe", "startupProbe"]:
        assert c[probe]["httpGet"]["path"] == "/health"
    args = c["args"]
    assert args[0] == "serve" and "--host=0.0.0.0" in args and "--device=cuda" in args
    mount = next(m for m in c["volumeMounts"] if m["name"] == "data")
    assert f"--data-dir={mount['mountPath']}" in args
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["spec"]["volumes"]}
    assert claims["data"] == pvc["metadata"]["name"]
    port = c["ports"][0]
    assert svc["spec"]["ports"][0]["targetPort"] == port["name"]
    # The ServiceMonitor (a CRD: not in the bundled schemas) selects the Service and its port.
    assert mon["apiVersion"] == "monitoring.coreos.com/v1"
    assert mon["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    ep = mon["spec"]["endpoints"][0]
    assert ep["port"] == svc["spec"]["ports"][0]["name"] and ep["path"] == "/metrics"


def test_replica_manifests_share_one_store():
    """deploy/k8s/replicas: N replicas with one PostgreSQL URL (from a secret that names the
    PostgreSQL Service), one ReadWriteMany adapter store, the pod name as replica id; the Service
    and ServiceMonitor of deploy/k8s select them."""
    docs = [d for m in manifests(REPLICAS) for d in load(m)]
    kinds = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    dep = kinds[("Deployment", "tandem")]
    assert dep["spec"]["replicas"] >= 2
    pod = dep["spec"]["template"]
    c = pod["spec"]["containers"][0]
    args, env = c["args"], {e["name"]: e for e in c["env"]}
    assert args[0] == "serve" and "--device=cuda" in args
    assert env["TANDEM_DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {"name": "tandem-db", "key": "url"}
    assert env["TANDEM_REPLICA_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    store = next(a.split("=", 1)[1] for a in args if a.startswith("--adapter-store="))
    mount = next(m for m in c["volumeMounts"] if m["mountPath"] == store)
    vol = next(v for v in pod["spec"]["volumes"] if v["name"] == mount["name"])
    pvc = kinds[("PersistentVolumeClaim", vol["persistentVolumeClaim"]["claimName"])]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    for probe in ["readinessProbe", "livenessProbe", "startupProbe"]:
        assert c[probe]["httpGet"]["path"] == "/health"
    # The secret's URL (documented in postgres.yaml) names the PostgreSQL Service and its port.
    pg_svc = kinds[("Service", "tandem-postgres")]
    pg = kinds[("StatefulSet", "tandem-postgres")]
    assert pg_svc["spec"]["selector"].items() <= pg["spec"]["template"]["metadata"]["labels"].items()
    text = open(os.path.join(REPLICAS, "postgres.yaml")).read()
    assert f"@tandem-postgres:{pg_svc['spec']['ports'][0]['port']}/tandem" in text
    # deploy/k8s's Service (and so its ServiceMonitor) selects these pods too.
    (svc,) = load(os.path.join(K8S, "service.yaml"))
    assert svc["spec"]["selector"].items() <= pod["metadata"]["labels"].items()


def test_compose_mounts_existing_files_and_prometheus_scrapes_tandem():
    (compose,) = load(os.path.join(DEPLOY, "docker-compose.yml"))
    services = compose["services"]
    assert {"tandem", "prometheus", "grafana"} <= services.keys()
    for name, s in services.items():
        for v in s.get("volumes", []):
            src = v.split(":")[0]
            if src.startswith("."):
                assert os.path.exists(os.path.join(DEPLOY, src)), (name, src)
    build = services["tandem"]["build"]
    assert os.path.exists(os.path.join(DEPLOY, build["context"], build["dockerfile"]))
    (prom,) = load(os.path.join(DEPLOY, "prometheus", "prometheus.yml"))
    targets = prom["scrape_configs"][0]["static_configs"][0]["targets"]
    assert targets == ["tandem:8000"] and "8000:8000" in services["tandem"]["ports"]
    (ds,) = load(os.path.join(DEPLOY, "grafana", "provisioning", "datasources", "prometheus.yml"))
    assert ds["datasources"][0]["type"] == "prometheus"
    assert ds["datasources"][0]["url"] == "http://prometheus:9090"
