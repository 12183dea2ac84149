#!/usr/bin/env bash
# The Kubernetes manifests and the observability files, checked offline:
#
#   scripts/k8s.sh                      render every overlay (deploy/k8s/overlays/*,
#                                       and production with the optional components)
#                                       and validate it; check the alert rules and
#                                       the dashboard. Exits non-zero on any error.
#                                       (`make lint-k8s`, and part of `make lint`)
#   scripts/k8s.sh render OVERLAY       print what an overlay renders to (dev, production)
#   scripts/k8s.sh prometheus-rule [NS] print deploy/observability/alerts.yaml as a
#                                       Prometheus Operator PrometheusRule (namespace NS,
#                                       default monitoring)
#
# Tools, installed on first use and then offline:
# - kustomize itself (sigs.k8s.io/kustomize/api, as `kubectl apply -k` uses
#   it), compiled into the pykustomize package from PyPI. Its wheel says it
#   wants Python 3.14, but it is a shared library behind cffi that loads in any
#   Python 3: installed with --ignore-requires-python into .run/venv.
# - kubernetes-validate (PyPI): the Kubernetes OpenAPI schemas of every
#   release from 1.25 on, bundled; objects are validated strictly (an unknown
#   field is an error) against KUBE_VERSION (default 1.30, the oldest release
#   these manifests target).
# - @prometheus-io/lezer-promql (npm, Prometheus's own PromQL grammar, the one
#   its web UI parses with), in .tools/promql: every alert and dashboard
#   expression must parse.
# On top of the schemas, the pods are checked against the Pod Security
# `restricted` profile (and a read-only root filesystem), images must carry a
# release tag (the workspace version, never `latest`), the migration Job must
# be named after it, the shutdown timings and probes must agree with the
# configuration, and the PostgreSQL connection budget must fit (see
# deploy/k8s/base/kustomization.yaml).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

KUBE_VERSION="${KUBE_VERSION:-1.30.0}"
PROMQL_DIR=.tools/promql

install_python_tools() {
  venv_install 'pykustomize, kubernetes_validate, yaml' --ignore-requires-python \
    pykustomize==0.1.4 kubernetes-validate==1.37.0 PyYAML
}

install_promql() {
  if [ ! -f "$PROMQL_DIR/node_modules/@prometheus-io/lezer-promql/package.json" ]; then
    mkdir -p "$PROMQL_DIR"
    npm install --silent --no-audit --no-fund --prefix "$PROMQL_DIR" \
      @prometheus-io/lezer-promql@0.315.0 @lezer/lr@1 @lezer/highlight@1 >/dev/null
  fi
}

case "${1:-check}" in
  check) ;;
  render)
    [ -n "${2:-}" ] && [ -d "deploy/k8s/overlays/$2" ] ||
      { echo "usage: scripts/k8s.sh render {$(ls deploy/k8s/overlays | paste -sd '|')}" >&2; exit 2; }
    ;;
  prometheus-rule) ;;
  *) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
esac

install_python_tools
[ "${1:-check}" = check ] && install_promql

exec "$VENV/bin/python" - "$KUBE_VERSION" "$PROMQL_DIR" "$@" <<'PY'
import asyncio
import json
import math
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import kubernetes_validate
import pykustomize
import yaml

KUBE_VERSION, PROMQL_DIR = sys.argv[1], sys.argv[2]
COMMAND = sys.argv[3] if len(sys.argv) > 3 else "check"
ARGS = sys.argv[4:]

K8S = Path("deploy/k8s")
OBSERVABILITY = Path("deploy/observability")
# Kinds from CRDs (cert-manager, the Prometheus Operator): no schema bundled,
# so only the fields these manifests rely on are checked.
CRD_REQUIRED = {
    ("cert-manager.io", "Certificate"): ["spec.secretName", "spec.issuerRef.name", "spec.dnsNames"],
    ("monitoring.coreos.com", "PodMonitor"): ["spec.selector", "spec.podMetricsEndpoints"],
}
# PostgreSQL connections: max_connections (the default, which the dev
# StatefulSet sets explicitly), superuser_reserved_connections, room kept for
# people and tools, and what `<service> migrate` opens (a pool of 2).
PG_MAX_CONNECTIONS = 100
PG_SUPERUSER_RESERVED = 3
PG_HEADROOM = 8
MIGRATE_CONNECTIONS = 2
SEVERITIES = {"critical", "warning", "info"}

errors: list[str] = []


def error(where: str, message: str) -> None:
    errors.append(f"{where}: {message}")


def render(path: Path) -> str:
    return asyncio.run(pykustomize.build(str(path))).yaml


def dig(obj, dotted: str):
    for key in dotted.split("."):
        if not isinstance(obj, dict) or key not in obj:
            return None
        obj = obj[key]
    return obj


def name_of(obj: dict) -> str:
    return f"{obj.get('kind')}/{dig(obj, 'metadata.name')}"


def pod_spec(obj: dict):
    kind = obj.get("kind")
    if kind == "Pod":
        return obj.get("spec")
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
        return dig(obj, "spec.template.spec")
    if kind == "CronJob":
        return dig(obj, "spec.jobTemplate.spec.template.spec")
    return None


def containers(spec: dict):
    for field in ("initContainers", "containers", "ephemeralContainers"):
        for c in spec.get(field) or []:
            yield c


# --- the schemas ------------------------------------------------------------


def validate_schema(where: str, obj: dict) -> None:
    group = obj.get("apiVersion", "").rpartition("/")[0]
    required = CRD_REQUIRED.get((group, obj.get("kind")))
    if required is not None:
        for field in required:
            if dig(obj, field) in (None, "", [], {}):
                error(where, f"{field} is missing")
        return
    try:
        kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        path = ".".join(str(p) for p in e.path) or "(top)"
        error(where, f"does not match the Kubernetes {e.version} schema at {path}: {e.message}")
    except kubernetes_validate.SchemaNotFoundError as e:
        error(where, e.message)


# --- Pod Security `restricted`, images, probes --------------------------------

ALLOWED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral",
                   "persistentVolumeClaim", "projected", "secret"}


def check_pod(where: str, spec: dict) -> None:
    pod_sc = spec.get("securityContext") or {}
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(field):
            error(where, f"{field} is not allowed (restricted)")
    for volume in spec.get("volumes") or []:
        kinds = set(volume) - {"name"}
        if not kinds <= ALLOWED_VOLUMES:
            error(where, f"volume {volume.get('name')}: {', '.join(sorted(kinds))} is not allowed (restricted)")
    for c in containers(spec):
        at = f"{where} container {c.get('name')}"
        sc = c.get("securityContext") or {}

        def effective(key):
            return sc[key] if key in sc else pod_sc.get(key)

        if effective("runAsNonRoot") is not True:
            error(at, "runAsNonRoot must be true (pod or container)")
        for key in ("runAsUser", "runAsGroup"):
            value = effective(key)
            if not isinstance(value, int) or isinstance(value, bool):
                error(at, f"{key} must be a number (pod or container)")
            elif value == 0:
                error(at, f"{key} must not be 0")
        seccomp = (sc.get("seccompProfile") or pod_sc.get("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            error(at, "seccompProfile.type must be RuntimeDefault (pod or container)")
        if sc.get("allowPrivilegeEscalation") is not False:
            error(at, "securityContext.allowPrivilegeEscalation must be false")
        if sc.get("privileged"):
            error(at, "privileged is not allowed")
        caps = sc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            error(at, "securityContext.capabilities.drop must include ALL")
        if set(caps.get("add") or []) - {"NET_BIND_SERVICE"}:
            error(at, "only NET_BIND_SERVICE may be added to the capabilities")
        if sc.get("readOnlyRootFilesystem") is not True:
            error(at, "securityContext.readOnlyRootFilesystem must be true")
        for port in c.get("ports") or []:
            if port.get("hostPort"):
                error(at, "hostPort is not allowed")
        check_image(at, c.get("image", ""))


def check_image(where: str, image: str) -> None:
    if "@sha256:" in image:
        return
    last = image.rsplit("/", 1)[-1]
    if ":" not in last:
        error(where, f"image {image!r} has no tag (pin a release, never rely on `latest`)")
    elif last.rsplit(":", 1)[1] == "latest":
        error(where, f"image {image!r} is tagged latest: pin a release")


def image_tag(image: str):
    last = image.rsplit("/", 1)[-1]
    return last.rsplit(":", 1)[1] if ":" in last else None


def config_of(objects: list[dict], container: dict) -> dict:
    """The values a container sees from its ConfigMaps (envFrom) and env."""
    maps = {dig(o, "metadata.name"): o.get("data") or {} for o in objects if o.get("kind") == "ConfigMap"}
    values = {}
    for source in container.get("envFrom") or []:
        ref = dig(source, "configMapRef.name")
        if ref:
            values.update(maps.get(ref, {}))
    for env in container.get("env") or []:
        if "value" in env:
            values[env["name"]] = env["value"]
    return values


def check_service(where: str, obj: dict, objects: list[dict]) -> None:
    """A Deployment of ours: probes on the health port, shutdown timings."""
    spec = pod_spec(obj)
    for c in spec.get("containers") or []:
        at = f"{where} container {c.get('name')}"
        config = config_of(objects, c)
        health = config.get("HEALTH_LISTEN_ADDR", "")
        if not health:
            error(at, "HEALTH_LISTEN_ADDR is not set: the gRPC probes have nothing to ask")
            continue
        health_port = int(health.rsplit(":", 1)[1])
        wanted = {"startupProbe": "liveness", "livenessProbe": "liveness", "readinessProbe": "readiness"}
        for probe, service in wanted.items():
            grpc = dig(c, f"{probe}.grpc")
            if not grpc:
                error(at, f"{probe} must be a gRPC probe")
            elif grpc.get("port") != health_port or grpc.get("service") != service:
                error(at, f"{probe} must ask port {health_port} (HEALTH_LISTEN_ADDR) for service {service!r}")
        if not config.get("METRICS_ADDR"):
            error(at, "METRICS_ADDR is not set")
        if not config.get("DATABASE_MAX_CONNECTIONS"):
            error(at, "DATABASE_MAX_CONNECTIONS is not set (the connection budget counts it)")
        delay = int(config.get("SHUTDOWN_DELAY_SECONDS", 0))
        grace = int(config.get("SHUTDOWN_GRACE_SECONDS", 10))
        termination = spec.get("terminationGracePeriodSeconds", 30)
        if termination <= delay + grace:
            error(at, f"terminationGracePeriodSeconds ({termination}) must exceed "
                      f"SHUTDOWN_DELAY_SECONDS + SHUTDOWN_GRACE_SECONDS ({delay} + {grace})")


# --- the release and the connection budget ------------------------------------


def workspace_version() -> str:
    with open("Cargo.toml", "rb") as f:
        return tomllib.load(f)["workspace"]["package"]["version"]


def check_release(overlay: str, objects: list[dict], version: str) -> None:
    for obj in objects:
        spec = pod_spec(obj)
        if not spec:
            continue
        for c in containers(spec):
            image = c.get("image", "")
            if image.rsplit(":", 1)[0].rsplit("/", 1)[-1] in ("enrollment", "key-issuance", "redemption"):
                tag = image_tag(image)
                if tag is not None and tag != version:
                    error(f"{overlay} {name_of(obj)}", f"image {image} is not the workspace version "
                          f"{version} (Cargo.toml): set newTag in deploy/k8s/base/kustomization.yaml")
    jobs = [o for o in objects if o.get("kind") == "Job" and dig(o, "metadata.name").startswith("trainingkeys-migrate")]
    if len(jobs) != 1:
        error(overlay, f"expected one migration Job, found {len(jobs)}")
    for job in jobs:
        tags = {image_tag(c.get("image", "")) for c in containers(pod_spec(job))}
        expected = {f"trainingkeys-migrate-{t}" for t in tags}
        if len(tags) != 1 or dig(job, "metadata.name") not in expected:
            error(f"{overlay} {name_of(job)}", f"must be named trainingkeys-migrate-<the tag of its images> "
                  f"(tags: {sorted(map(str, tags))}): each release needs a new Job")


def surge(deployment: dict, replicas: int) -> int:
    value = dig(deployment, "spec.strategy.rollingUpdate.maxSurge")
    if dig(deployment, "spec.strategy.type") == "Recreate":
        return 0
    if value is None:
        value = "25%"
    if isinstance(value, str) and value.endswith("%"):
        return math.ceil(replicas * int(value[:-1]) / 100)
    return int(value)


def check_budget(overlay: str, objects: list[dict]) -> str:
    hpa_max = {dig(o, "spec.scaleTargetRef.name"): dig(o, "spec.maxReplicas")
               for o in objects if o.get("kind") == "HorizontalPodAutoscaler"}
    lines, total, per_role, migration = [], 0, {}, 0
    for obj in objects:
        spec = pod_spec(obj)
        if not spec:
            continue
        for c in spec.get("containers") or []:
            secrets = [dig(s, "secretRef.name") or "" for s in c.get("envFrom") or []]
            # The role's Secret (a generator may have added a hash suffix).
            role = next((m.group(1) for s in secrets
                         if (m := re.match(r"(trainingkeys-db-(enrollment|key-issuance|redemption))", s))), None)
            if role is None:
                continue
            if obj.get("kind") == "Job":
                count = MIGRATE_CONNECTIONS
                migration += count
            else:
                name = dig(obj, "metadata.name")
                replicas = hpa_max.get(name) or dig(obj, "spec.replicas") or 1
                extra = surge(obj, replicas)
                per_pod = int(config_of(objects, c).get("DATABASE_MAX_CONNECTIONS", 20))
                count = (replicas + extra) * per_pod
                lines.append(f"{name} ({replicas}+{extra})x{per_pod}={count}")
            total += count
            per_role[role] = per_role.get(role, 0) + count
    if migration:
        lines.append(f"migration {migration}")
    limit = PG_MAX_CONNECTIONS
    for obj in objects:  # a PostgreSQL the overlay runs itself
        args = dig(obj, "spec.template.spec.containers") or []
        for c in args:
            for arg in c.get("args") or []:
                m = re.fullmatch(r"max_connections=(\d+)", str(arg))
                if m:
                    limit = int(m.group(1))
    need = total + PG_SUPERUSER_RESERVED + PG_HEADROOM
    summary = (f"{' + '.join(lines)} = {total}, + {PG_SUPERUSER_RESERVED} superuser + "
               f"{PG_HEADROOM} headroom = {need} <= max_connections {limit}")
    if need > limit:
        error(overlay, f"PostgreSQL connection budget exceeded: {summary.replace('<=', '>')}")
    # The roles' CONNECTION LIMITs, where the overlay creates the roles itself.
    for obj in objects:
        if obj.get("kind") != "ConfigMap":
            continue
        for key, sql in (obj.get("data") or {}).items():
            if not key.endswith(".sql"):
                continue
            for role, cap in re.findall(r"CREATE ROLE (\w+) .*?CONNECTION LIMIT (\d+)", sql):
                secret = "trainingkeys-db-" + role.replace("_", "-")
                if per_role.get(secret, 0) > int(cap):
                    error(overlay, f"role {role}: CONNECTION LIMIT {cap} in {key} is below its "
                                   f"pods' and migration's {per_role[secret]}")
    return summary


# --- the overlays -------------------------------------------------------------


def check_overlay(label: str, path: Path, version: str) -> None:
    try:
        text = render(path)
    except pykustomize.KustomizeError as e:
        error(label, f"kustomize build failed: {e}")
        return
    objects = [o for o in yaml.safe_load_all(text) if o]
    kinds: dict[str, int] = {}
    for obj in objects:
        where = f"{label} {name_of(obj)}"
        kinds[obj.get("kind")] = kinds.get(obj.get("kind"), 0) + 1
        validate_schema(where, obj)
        if obj.get("kind") == "Namespace":
            labels = dig(obj, "metadata.labels") or {}
            if labels.get("pod-security.kubernetes.io/enforce") != "restricted":
                error(where, "must be labelled pod-security.kubernetes.io/enforce: restricted")
        spec = pod_spec(obj)
        if spec is not None:
            check_pod(where, spec)
        if (obj.get("kind") == "Deployment"
                and (dig(obj, "spec.template.metadata.labels") or {}).get("app.kubernetes.io/component") == "server"):
            check_service(where, obj, objects)
    check_release(label, objects, version)
    budget = check_budget(label, objects)
    print(f"  {label}: {len(objects)} objects ({', '.join(f'{n} {k}' for k, n in sorted(kinds.items()))})")
    print(f"    PostgreSQL connections: {budget}")


# --- alerts and dashboard -----------------------------------------------------


def check_alerts(path: Path) -> list[tuple[str, str]]:
    exprs = []
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        error(str(path), f"does not parse: {e}")
        return exprs
    groups = doc.get("groups") if isinstance(doc, dict) else None
    if not groups:
        error(str(path), "no `groups:`")
        return exprs
    seen = set()
    count = 0
    for group in groups:
        for rule in group.get("rules") or []:
            name = rule.get("alert") or rule.get("record")
            where = f"{path} {group.get('name')}/{name}"
            if not isinstance(rule.get("expr"), str) or not rule["expr"].strip():
                error(where, "no expr")
                continue
            exprs.append((where, rule["expr"]))
            if "alert" not in rule:
                continue
            count += 1
            if name in seen:
                error(where, "alert name used twice")
            seen.add(name)
            if (rule.get("labels") or {}).get("severity") not in SEVERITIES:
                error(where, f"labels.severity must be one of {sorted(SEVERITIES)}")
            for key in ("summary", "description"):
                if not (rule.get("annotations") or {}).get(key):
                    error(where, f"annotations.{key} is missing")
            if "for" in rule and not re.fullmatch(r"(\d+[smhdwy])+", str(rule["for"])):
                error(where, f"`for: {rule['for']}` is not a duration")
    print(f"  {path}: {count} alerts in {len(groups)} groups")
    return exprs


def check_dashboard(path: Path) -> list[tuple[str, str]]:
    exprs = []
    try:
        dashboard = json.loads(path.read_text())
    except ValueError as e:
        error(str(path), f"is not JSON: {e}")
        return exprs
    for key in ("title", "uid", "panels", "schemaVersion"):
        if key not in dashboard:
            error(str(path), f"no {key!r}")
    variables = {v.get("name") for v in dashboard.get("templating", {}).get("list", [])}
    if "datasource" not in variables:
        error(str(path), "no `datasource` template variable")
    ids, count = set(), 0
    panels = list(dashboard.get("panels", []))
    for panel in panels:
        panels.extend(panel.get("panels") or [])  # collapsed rows
        if panel.get("id") in ids:
            error(str(path), f"panel id {panel.get('id')} used twice")
        ids.add(panel.get("id"))
        if panel.get("type") == "row":
            continue
        count += 1
        where = f"{path} panel {panel.get('title')!r}"
        if dig(panel, "datasource.uid") != "${datasource}":
            error(where, "datasource must be the ${datasource} variable")
        if not panel.get("targets"):
            error(where, "no queries")
        for target in panel.get("targets") or []:
            expr = target.get("expr", "")
            if not expr:
                error(where, f"query {target.get('refId')} has no expr")
                continue
            for var in re.findall(r"\$\{?(\w+)", expr):
                if var not in variables and not var.startswith("__"):
                    error(where, f"query uses ${var}, which is not a dashboard variable")
            # Grafana's variables, as Prometheus would receive them.
            expr = re.sub(r"\$\{?__(rate_)?interval\}?", "5m", expr)
            expr = re.sub(r"\$\{?\w+\}?", "x", expr)
            exprs.append((where, expr))
    print(f"  {path}: {count} panels")
    return exprs


PROMQL_CHECK = r"""
const { parser } = require(process.argv[1] + "/node_modules/@prometheus-io/lezer-promql");
const items = JSON.parse(require("fs").readFileSync(0, "utf8"));
const bad = [];
for (const [where, expr] of items) {
  const at = [];
  parser.parse(expr).iterate({ enter: (n) => { if (n.type.isError) at.push(n.from); } });
  if (at.length) bad.push([where, at[0], expr]);
}
process.stdout.write(JSON.stringify(bad));
"""


def check_promql(exprs: list[tuple[str, str]]) -> None:
    node = shutil.which("node")
    if node is None:
        error("PromQL", "node is not installed: the expressions cannot be parsed")
        return
    out = subprocess.run([node, "-e", PROMQL_CHECK, str(Path(PROMQL_DIR).resolve())],
                         input=json.dumps(exprs), capture_output=True, text=True)
    if out.returncode != 0:
        error("PromQL", f"the parser failed: {out.stderr.strip()}")
        return
    for where, at, expr in json.loads(out.stdout):
        error(where, f"PromQL does not parse at character {at}: {expr[max(0, at - 30):at + 30]!r}")
    print(f"  PromQL: {len(exprs)} expressions parsed")


# --- commands -----------------------------------------------------------------


def check() -> int:
    version = workspace_version()
    print(f"kustomize {pykustomize.native_version()}, Kubernetes {KUBE_VERSION} schemas "
          f"(strict), release {version}")
    for overlay in sorted(p for p in (K8S / "overlays").iterdir() if p.is_dir()):
        check_overlay(overlay.name, overlay, version)
    # The optional components, on top of production (an overlay of its own,
    # made where kustomize accepts relative paths to them).
    scratch = Path(".run/k8s/production-with-components")
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    up = "../../.."
    components = sorted(p.name for p in (K8S / "components").iterdir() if p.is_dir())
    (scratch / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [f"{up}/{K8S}/overlays/production"],
        "components": [f"{up}/{K8S}/components/{c}" for c in components],
    }))
    check_overlay(f"production+{'+'.join(components)}", scratch, version)
    exprs = check_alerts(OBSERVABILITY / "alerts.yaml")
    try:
        prometheus_rule("monitoring")
    except (ValueError, yaml.YAMLError) as e:
        error("scripts/k8s.sh prometheus-rule", str(e))
    exprs += check_dashboard(OBSERVABILITY / "dashboard.json")
    check_promql(exprs)
    if errors:
        print(f"\n{len(errors)} error(s):", file=sys.stderr)
        for e in errors:
            print(f"  {e}", file=sys.stderr)
        return 1
    print("ok: every overlay renders and validates; alerts and dashboard check out")
    return 0


def prometheus_rule(namespace: str) -> str:
    """alerts.yaml's groups, as they are (comments kept), under a PrometheusRule."""
    text = (OBSERVABILITY / "alerts.yaml").read_text()
    groups = text[text.index("\ngroups:") + 1:]
    rule = (
        "# Generated from deploy/observability/alerts.yaml by scripts/k8s.sh prometheus-rule.\n"
        "apiVersion: monitoring.coreos.com/v1\n"
        "kind: PrometheusRule\n"
        "metadata:\n"
        "  name: trainingkeys\n"
        f"  namespace: {namespace}\n"
        "  labels:\n"
        "    app.kubernetes.io/part-of: trainingkeys\n"
        "spec:\n"
        + "".join(f"  {line}" if line.strip() else line for line in groups.splitlines(keepends=True))
    )
    if yaml.safe_load(rule)["spec"] != yaml.safe_load(text):
        raise ValueError("the PrometheusRule does not hold alerts.yaml's groups")
    return rule


if COMMAND == "render":
    print(render(K8S / "overlays" / ARGS[0]), end="")
    sys.exit(0)
if COMMAND == "prometheus-rule":
    print(prometheus_rule(ARGS[0] if ARGS else "monitoring"), end="")
    sys.exit(0)
sys.exit(check())
PY
