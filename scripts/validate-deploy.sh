#!/usr/bin/env bash
# Checks deploy/ with every validator that runs offline on a fresh Debian machine: promtool
# (rules, rule unit tests, config, the dashboard's queries), Kubernetes schemas, the Compose
# schema, systemd-analyze, nginx -t, and cross-file consistency. Run by .ci/run.
#
# Tools come from the package registries into a cache (KALLINA_VALIDATE_CACHE, default
# ~/.cache/kallina-relay-validate), not into the system: promtool and nginx are extracted from
# their Debian packages without installing them, because installing would run their
# maintainer scripts, which start the daemons; the Python validators go into a virtualenv.
# About 20 seconds on a fresh machine (most of it installing the Python validators), a few
# once cached.
#
# Every check runs, then the script exits 1 if any failed. A check whose tool cannot be had
# here is skipped with the reason; under CI=true a skip fails the run too.
set -euo pipefail
cd "$(dirname "$0")/.."

cache=${KALLINA_VALIDATE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kallina-relay-validate}
mkdir -p "$cache"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# Versions last checked together; the virtualenv is rebuilt when this line changes.
python_tools="kubernetes-validate==1.37.0 check-jsonschema==0.39.0 PyYAML==6.0.3 docker==7.1.0"
venv=$cache/venv
py=$venv/bin/python
# Kubernetes versions the manifests must be valid for: an old one still in service, and the
# newest kubernetes-validate knows.
k8s_versions="1.29.0 1.37.0"

skip() {
  echo "$*" >"$work/skip-reason"
  exit 3
}

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

have_apt() { command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null; }

# Fetches one Debian package and unpacks PATHS of it under DEST, running nothing from it.
deb_extract() {
  local package=$1 dest=$2
  shift 2
  local dir
  dir=$(mktemp -d -p "$work")
  # A fresh machine may have no package lists yet.
  if ! (cd "$dir" && apt-get -qq -o APT::Sandbox::User=root download "$package" >/dev/null 2>&1); then
    as_root apt-get update -qq
    (cd "$dir" && apt-get -qq -o APT::Sandbox::User=root download "$package" >/dev/null)
  fi
  mkdir -p "$dest"
  dpkg-deb --fsys-tarfile "$dir/$package"_*.deb | tar -x -C "$dest" "$@"
}

promtool_bin() {
  if command -v promtool >/dev/null; then
    command -v promtool
    return
  fi
  local bin=$cache/prometheus/usr/bin/promtool
  if [ ! -x "$bin" ]; then
    have_apt || skip "no promtool and no apt-get to fetch Debian's prometheus package"
    deb_extract prometheus "$cache/prometheus" ./usr/bin/promtool >&2
  fi
  echo "$bin"
}

nginx_bin() {
  have_apt || [ -x "$cache/nginx/usr/sbin/nginx" ] || skip "no apt-get to fetch Debian's nginx package"
  KALLINA_NGINX_CACHE=$cache/nginx scripts/ensure-nginx.sh
}

python_ready() {
  [ -x "$py" ] && [ "$(cat "$venv/.tools" 2>/dev/null)" = "$python_tools" ] && return
  command -v python3 >/dev/null || skip "no python3"
  rm -rf "$venv"
  if ! python3 -m venv "$venv" 2>/dev/null; then
    # Debian's own python3 keeps venv in a separate package.
    have_apt || skip "python3 cannot make a virtualenv and there is no apt-get to add python3-venv"
    rm -rf "$venv"
    as_root apt-get install -y -qq --no-install-recommends python3-venv >&2
    python3 -m venv "$venv"
  fi
  # shellcheck disable=SC2086 # one argument per requirement
  "$venv/bin/pip" install -q --disable-pip-version-check $python_tools
  echo "$python_tools" >"$venv/.tools"
}

# ---- the checks; each runs in its own subshell under set -e ----

check_python_tools() {
  python_ready
}

check_yaml() {
  python_ready
  "$py" - <<'PY'
import pathlib, sys, yaml
files = sorted(p for p in pathlib.Path("deploy").rglob("*") if p.suffix in (".yaml", ".yml"))
for path in files:
    try:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    except yaml.YAMLError as e:
        sys.exit(f"{path}: {e}")
    if not docs:
        sys.exit(f"{path}: no YAML document")
print(f"{len(files)} files parse")
PY
}

check_prometheus_rules() {
  local promtool
  promtool=$(promtool_bin)
  "$promtool" check rules deploy/prometheus/alerts.yaml
  # Resolves rule_files relative to the file, as the Prometheus of compose.yaml does.
  "$promtool" check config deploy/prometheus/prometheus.yml
}

check_prometheus_rule_tests() {
  local promtool
  promtool=$(promtool_bin)
  (cd deploy/prometheus && "$promtool" test rules alerts.test.yaml)
}

# promtool parses the dashboard's PromQL as recording rules, once Grafana's variables are
# replaced with what they stand for.
check_grafana_dashboard() {
  python_ready
  local promtool
  promtool=$(promtool_bin)
  "$py" - "$work/dashboard-rules.yaml" <<'PY'
import json, pathlib, sys, yaml
board = json.loads(pathlib.Path("deploy/grafana/dashboard.json").read_text())
errors = []
for key in ("uid", "title", "panels", "templating", "schemaVersion"):
    if key not in board:
        errors.append(f"no `{key}`")
variables = {v["name"] for v in board.get("templating", {}).get("list", [])}
if not {"datasource", "instance"} <= variables:
    errors.append(f"template variables {sorted(variables)} lack datasource or instance")
rules, ids, cells = [], set(), {}
for panel in board.get("panels", []):
    pid, title = panel.get("id"), panel.get("title")
    if pid in ids:
        errors.append(f"panel id {pid} is used twice")
    ids.add(pid)
    grid = panel["gridPos"]
    if grid["x"] + grid["w"] > 24:
        errors.append(f"panel {title!r} is wider than the grid")
    area = {(x, y) for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])}
    for other in sorted({cells[c] for c in area if c in cells}):
        errors.append(f"panel {title!r} overlaps {other!r}")
    cells.update(dict.fromkeys(area, title))
    if panel["type"] == "row":
        continue
    if panel.get("datasource", {}).get("uid") != "${datasource}":
        errors.append(f"panel {title!r} does not use the $datasource variable")
    if not panel.get("targets"):
        errors.append(f"panel {title!r} has no query")
    for target in panel.get("targets", []):
        expr = (target["expr"].replace("$__rate_interval", "5m")
                .replace("$__interval", "1m").replace("$instance", ".*"))
        if "$" in expr:
            errors.append(f"panel {title!r}: unknown variable in {target['expr']!r}")
        rules.append({"record": f"dashboard:panel_{pid}_{target['refId']}", "expr": expr})
if errors:
    sys.exit("deploy/grafana/dashboard.json:\n  " + "\n  ".join(errors))
pathlib.Path(sys.argv[1]).write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
print(f"{len(board['panels'])} panels, {len(rules)} queries")
PY
  "$promtool" check rules "$work/dashboard-rules.yaml"
  "$py" -c 'import json, sys; [json.load(open(f)) for f in sys.argv[1:]]' deploy/grafana/dashboard.json
}

check_compose() {
  python_ready
  "$venv/bin/check-jsonschema" --builtin-schema vendor.compose-spec deploy/compose.yaml
  # What the schema cannot see: that the files and directories it mounts and builds exist.
  "$py" - <<'PY'
import pathlib, sys, yaml
base = pathlib.Path("deploy")
compose = yaml.safe_load((base / "compose.yaml").read_text())
missing = []
for name, service in compose["services"].items():
    build = service.get("build")
    if build:
        context = base / build["context"]
        if not (context / build.get("dockerfile", "Dockerfile")).is_file():
            missing.append(f"{name}: build dockerfile {build.get('dockerfile')} in {context}")
    for volume in service.get("volumes", []):
        source = volume.split(":")[0]
        if source.startswith((".", "/")) and not (base / source).exists():
            missing.append(f"{name}: mounted {source}")
if missing:
    sys.exit("deploy/compose.yaml refers to what does not exist:\n  " + "\n  ".join(missing))
print("every mounted path and the build context exist")
PY
  if docker compose version >/dev/null 2>&1; then
    docker compose -f deploy/compose.yaml config -q
  else
    echo "(docker compose plugin not here: its own config check not run)"
  fi
}

check_kubernetes() {
  python_ready
  local rendered=$work/kubernetes.yaml
  if command -v kubectl >/dev/null; then
    kubectl kustomize deploy/kubernetes >"$rendered"
  else
    # Without kustomize, the listed resources as they are (the generated ConfigMap is missing).
    echo "(kubectl not here: validating kustomization.yaml's resources unrendered)"
    "$py" - "$rendered" <<'PY'
import pathlib, sys, yaml
base = pathlib.Path("deploy/kubernetes")
kustomization = yaml.safe_load((base / "kustomization.yaml").read_text())
pathlib.Path(sys.argv[1]).write_text(
    "\n---\n".join((base / r).read_text() for r in kustomization["resources"]))
PY
  fi
  local version
  for version in $k8s_versions; do
    "$venv/bin/kubernetes-validate" --strict --quiet -k "$version" "$rendered" deploy/kubernetes/ingress.yaml
  done
  echo "rendered manifests and ingress.yaml valid for Kubernetes ${k8s_versions// /, }"
}

# systemd-analyze verify refuses a unit whose ExecStart binary does not exist, and the relay is
# not installed here: a copy with ExecStart pointing at an existing binary is verified instead.
# Everything else in the unit is checked as written.
check_systemd() {
  command -v systemd-analyze >/dev/null || skip "no systemd-analyze (Debian package systemd)"
  local unit=$work/kallina-relay.service out
  sed "s#^ExecStart=/usr/local/bin/kallina-relay #ExecStart=$(command -v true) #" \
    deploy/systemd/kallina-relay.service >"$unit"
  grep -q "^ExecStart=$(command -v true) " "$unit"
  # It exits 0 on unknown keys and bad values and only prints them: any output is a failure.
  out=$(systemd-analyze verify "$unit" 2>&1)
  if [ -n "$out" ]; then
    echo "$out"
    return 1
  fi
  # The sandbox's exposure score (0 = fully sandboxed, 10 = not at all) must stay at most 2.0.
  systemd-analyze security --offline=yes --threshold=20 --no-pager "$unit" | tail -n 1
}

check_nginx() {
  local nginx conf=$work/nginx
  nginx=$(nginx_bin)
  mkdir -p "$conf/tls" "$conf/tmp"
  command -v openssl >/dev/null || as_root apt-get install -y -qq --no-install-recommends openssl >&2
  # A throwaway certificate where the config expects the real one; the rest is checked as is.
  openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=relay.example.com \
    -keyout "$conf/tls/kallina-relay.key" -out "$conf/tls/kallina-relay.crt" 2>/dev/null
  sed "s#/etc/nginx/tls/#$conf/tls/#" deploy/nginx/kallina-relay.conf >"$conf/kallina-relay.conf"
  cat >"$conf/nginx.conf" <<EOF
pid $conf/nginx.pid;
error_log stderr;
events {}
http {
    client_body_temp_path $conf/tmp/body;
    proxy_temp_path $conf/tmp/proxy;
    fastcgi_temp_path $conf/tmp/fastcgi;
    uwsgi_temp_path $conf/tmp/uwsgi;
    scgi_temp_path $conf/tmp/scgi;
    access_log off;
    include $conf/kallina-relay.conf;
}
EOF
  "$nginx" -t -q -p "$conf" -c "$conf/nginx.conf" -e stderr
  echo "nginx -t: configuration is valid"
}

# No Docker engine is assumed, so the image is not built. What can break a build without one:
# .dockerignore leaving out a file cargo needs. The context is copied as Docker would send it
# (docker-py's .dockerignore matching); every target cargo finds in the repository must be in
# it (cargo refuses to build a package whose declared targets are missing, while
# `cargo metadata` just leaves them out), and cargo must accept the lock file there.
check_docker_context() {
  python_ready
  command -v cargo >/dev/null || skip "no cargo"
  cargo metadata --no-deps --offline --format-version 1 >"$work/metadata.json"
  "$py" - "$work/context" "$work/metadata.json" <<'PY'
import json, pathlib, shutil, sys
from docker.utils.build import exclude_paths
patterns = [line.strip() for line in pathlib.Path(".dockerignore").read_text().splitlines()
            if line.strip() and not line.startswith("#")]
context = pathlib.Path(sys.argv[1])
kept = exclude_paths(".", patterns, dockerfile="deploy/Dockerfile")
for path in kept:
    source = pathlib.Path(path)
    if source.is_file():
        (context / source).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, context / source)
root = pathlib.Path.cwd()
needed = {"Cargo.toml", "Cargo.lock"}
for package in json.loads(pathlib.Path(sys.argv[2]).read_text())["packages"]:
    for target in package["targets"]:
        needed.add(str(pathlib.Path(target["src_path"]).relative_to(root)))
missing = sorted(n for n in needed if not (context / n).is_file())
if missing:
    sys.exit(".dockerignore leaves out of the build context what cargo needs: " + ", ".join(missing))
print(f"build context: {len(kept)} paths, with all {len(needed) - 2} target roots of the package")
PY
  # Resolving the lock file reads every package's manifest, those of other platforms too
  # (Windows-only crates clippy never downloads): fetch them first, from crates.io.
  cargo fetch --locked --quiet
  (cd "$work/context" && cargo metadata --locked --offline --format-version 1 >/dev/null)
  echo "cargo accepts the context's lock file (--locked)"
}

# The same numbers stated in several files, which must agree with each other.
check_consistency() {
  python_ready
  "$py" - <<'PY'
import json, pathlib, re, sys, tomllib, yaml
d = pathlib.Path("deploy")
errors = []
def seconds(text):
    m = re.fullmatch(r"(\d+)(s|m)?", str(text).strip())
    return int(m[1]) * (60 if m[2] == "m" else 1)
def grace(toml_path):
    return seconds(tomllib.loads((d / toml_path).read_text()).get("shutdown_grace", "10s"))

docs = list(yaml.safe_load_all((d / "kubernetes/statefulset.yaml").read_text()))
pod = docs[0]["spec"]["template"]["spec"]
container = pod["containers"][0]
pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
k8s_grace = grace("kubernetes/kallina-relay.toml")
if pod["terminationGracePeriodSeconds"] <= pre_stop + k8s_grace:
    errors.append(f"kubernetes: terminationGracePeriodSeconds {pod['terminationGracePeriodSeconds']} "
                  f"<= preStop {pre_stop}s + shutdown_grace {k8s_grace}s")
example_grace = grace("kallina-relay.example.toml")
compose = yaml.safe_load((d / "compose.yaml").read_text())
stop = seconds(compose["services"]["relay"]["stop_grace_period"])
if stop <= example_grace:
    errors.append(f"compose: stop_grace_period {stop}s <= shutdown_grace {example_grace}s")
unit = (d / "systemd/kallina-relay.service").read_text()
timeout = seconds(re.search(r"^TimeoutStopSec=(\S+)$", unit, re.M)[1])
if timeout <= example_grace:
    errors.append(f"systemd: TimeoutStopSec {timeout}s <= shutdown_grace {example_grace}s")

env = {e["name"]: e.get("value") for e in container["env"]}
ports = {p["name"]: p["containerPort"] for p in container["ports"]}
if not env["KALLINA_RELAY_ADMIN_LISTEN"].endswith(f":{ports['admin']}"):
    errors.append("kubernetes: KALLINA_RELAY_ADMIN_LISTEN does not match the admin port")
dockerfile = (d / "Dockerfile").read_text()
admin = re.search(r"KALLINA_RELAY_ADMIN_LISTEN=0\.0\.0\.0:(\d+)", dockerfile)[1]
if f"/dev/tcp/127.0.0.1/{admin}" not in dockerfile or not re.search(rf"^EXPOSE .*\b{admin}\b", dockerfile, re.M):
    errors.append(f"Dockerfile: HEALTHCHECK or EXPOSE is not on the admin port {admin}")
prometheus = yaml.safe_load((d / "prometheus/prometheus.yml").read_text())
relay_job = next(j for j in prometheus["scrape_configs"] if j["job_name"] == "kallina-relay")
if relay_job["static_configs"][0]["targets"] != [f"relay:{admin}"]:
    errors.append("prometheus.yml does not scrape the relay's admin port")

outbox_max = int(tomllib.loads((d / "kubernetes/kallina-relay.toml").read_text())["outbox_max"])
thresholds = set(re.findall(r"kallina_relay_outbox_events > (\d+)\)?$",
                            (d / "prometheus/alerts.yaml").read_text(), re.M))
if thresholds != {str(outbox_max * 8 // 10)}:
    errors.append(f"alerts.yaml's outbox thresholds {sorted(thresholds)} are not 80 % of outbox_max {outbox_max}")
if errors:
    sys.exit("\n".join(errors))
print("grace periods, admin port and outbox thresholds agree across files")
PY
}

# ---- run them all ----

failed=()
skipped=()
run() {
  local name=$1 check=$2 started=$SECONDS status
  printf '%-28s ' "$name"
  rm -f "$work/skip-reason"
  set +e
  (
    set -e
    "$check"
  ) >"$work/log" 2>&1
  status=$?
  set -e
  local took=$((SECONDS - started))s
  case $status in
    0) echo "ok ($took)" ;;
    3)
      echo "SKIPPED: $(cat "$work/skip-reason" 2>/dev/null || echo "no reason given")"
      skipped+=("$name")
      ;;
    *)
      echo "FAILED ($took)"
      sed 's/^/    /' "$work/log"
      failed+=("$name")
      ;;
  esac
  if [ -n "${VERBOSE:-}" ] && [ "$status" = 0 ]; then sed 's/^/    /' "$work/log"; fi
}

echo "validate-deploy: checking deploy/ (tools cached in $cache)"
run "python validators" check_python_tools
run "YAML syntax" check_yaml
run "prometheus rules, config" check_prometheus_rules
run "prometheus rule tests" check_prometheus_rule_tests
run "grafana dashboard" check_grafana_dashboard
run "compose" check_compose
run "kubernetes" check_kubernetes
run "systemd unit" check_systemd
run "nginx" check_nginx
run "docker build context" check_docker_context
run "consistency" check_consistency

if [ ${#failed[@]} -gt 0 ]; then
  echo "validate-deploy: FAILED: ${failed[*]}" >&2
  exit 1
fi
if [ ${#skipped[@]} -gt 0 ]; then
  if [ "${CI:-}" = true ]; then
    echo "validate-deploy: skipped under CI, which must run every check: ${skipped[*]}" >&2
    exit 1
  fi
  echo "validate-deploy: passed, but skipped: ${skipped[*]}"
  exit 0
fi
echo "validate-deploy: all checks passed"
