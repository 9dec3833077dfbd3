#!/usr/bin/env bash
# Offline validation of the k3s manifests in image/k3s/, for CI and for a developer without a
# cluster: every manifest against the Kubernetes OpenAPI schemas (kubernetes-validate --strict,
# so a misspelt or misplaced field fails), then against checkov's Kubernetes policies with zero
# failed checks. A check the manifests skip is named in the manifest itself
# (`checkov.io/skipN: CKV_K8S_xx=reason`), and this script prints every skip with its reason.
#
# Needs, on a fresh Debian machine as root: `apt-get install -y python3 python3-venv`
# (any python3 with the venv module does, e.g. pyenv's), and PyPI reachable the first time.
# The venv lives under $QUOTE_EDGE_PIP_CACHE (default /var/cache/quote-edge/pip) and is reused
# while its pinned versions and the constraints file match (PIP_CACHE_DIR points beside it).
#
# Usage: tests/cluster/validate-manifests.sh     exit 0 when every step passes, 1 otherwise.
set -euo pipefail

root=$(cd "$(dirname "$0")/../.." && pwd)
manifests=$root/image/k3s
constraints=$root/tests/cluster/validate-manifests.constraints.txt

# Pinned tools; the constraints file pins everything they pull in, so a new release of a
# dependency cannot change the verdict between two CI runs.
KUBERNETES_VALIDATE_VERSION=1.37.0
CHECKOV_VERSION=3.3.30
# The newest schema this kubernetes-validate ships, and the oldest k3s the manifests support
# (v1.30: the first release where `lifecycle.preStop.sleep` is on by default).
K8S_VERSIONS=(1.30.0 1.37.0)

cache=${QUOTE_EDGE_PIP_CACHE:-/var/cache/quote-edge/pip}
python=${PYTHON:-python3}
venv=$cache/venv-kv$KUBERNETES_VALIDATE_VERSION-checkov$CHECKOV_VERSION
stamp=$venv/.installed

failures=0
pass() { printf 'PASS  %s\n' "$*"; }
fail() { printf 'FAIL  %s\n' "$*"; failures=$((failures + 1)); }

mapfile -t files < <(find "$manifests" -maxdepth 1 -name '*.yaml' | sort)
if [ ${#files[@]} -eq 0 ]; then
    fail "no manifests found in $manifests"
    exit 1
fi

# 1. The venv: reused when its stamp names the same pins and its python still runs (a venv
# made by a python that has since gone is rebuilt).
start=$SECONDS
want="kubernetes-validate==$KUBERNETES_VALIDATE_VERSION checkov==$CHECKOV_VERSION $(sha256sum "$constraints" | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$venv/bin/python" -c 'import sys' 2>/dev/null; then
    how="reused"
else
    how="created"
    rm -rf "$venv"
    mkdir -p "$cache"
    if ! "$python" -m venv "$venv"; then
        fail "venv: '$python -m venv' failed (on Debian: apt-get install -y python3-venv)"
        exit 1
    fi
    if ! PIP_CACHE_DIR=$cache/wheels "$venv/bin/pip" install --quiet --disable-pip-version-check \
        -c "$constraints" \
        "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION" "checkov==$CHECKOV_VERSION"; then
        fail "venv: pip install of kubernetes-validate $KUBERNETES_VALIDATE_VERSION and checkov $CHECKOV_VERSION"
        exit 1
    fi
    printf '%s\n' "$want" >"$stamp"
fi
pass "venv $how in $((SECONDS - start)) s: $venv ($("$venv/bin/python" --version))"

# 2. Schemas: every field known, every required field present, for each Kubernetes version.
for version in "${K8S_VERSIONS[@]}"; do
    start=$SECONDS
    if out=$("$venv/bin/kubernetes-validate" --strict --kubernetes-version "$version" "${files[@]}" 2>&1); then
        pass "kubernetes-validate $KUBERNETES_VALIDATE_VERSION --strict, Kubernetes $version: ${#files[@]} files ($((SECONDS - start)) s)"
    else
        printf '%s\n' "$out"
        fail "kubernetes-validate $KUBERNETES_VALIDATE_VERSION --strict, Kubernetes $version"
    fi
done

# 3. Policies: checkov, no download from any vendor service, zero failed checks.
start=$SECONDS
report=$(mktemp -d)
trap 'rm -rf "$report"' EXIT
set +e
"$venv/bin/checkov" --framework kubernetes --directory "$manifests" --skip-download \
    --output cli --output json --output-file-path "$report" >/dev/null 2>"$report/stderr"
status=$?
set -e
if [ ! -s "$report/results_json.json" ]; then
    cat "$report/stderr"
    fail "checkov $CHECKOV_VERSION wrote no report (exit $status)"
else
    # Counts, failures and every skip with the reason the manifest gives for it.
    "$venv/bin/python" - "$report/results_json.json" <<'EOF' || status=1
import json, sys
report = json.load(open(sys.argv[1]))
if isinstance(report, list):
    report = next(r for r in report if r.get("check_type") == "kubernetes")
summary = report["summary"]
results = report["results"]
print(f"checkov: passed {summary['passed']}, failed {summary['failed']}, skipped {summary['skipped']}, "
      f"parsing errors {summary['parsing_errors']}, resources {summary['resource_count']}")
for check in results.get("failed_checks", []):
    print(f"  failed  {check['check_id']} {check['resource']} ({check['file_path']}): {check['check_name']}")
for check in results.get("skipped_checks", []):
    reason = (check.get("check_result") or {}).get("suppress_comment", "")
    print(f"  skipped {check['check_id']} {check['resource']}: {reason}")
sys.exit(1 if summary["failed"] or summary["parsing_errors"] else 0)
EOF
    if [ "$status" -eq 0 ]; then
        pass "checkov $CHECKOV_VERSION --framework kubernetes: zero failed checks ($((SECONDS - start)) s)"
    else
        fail "checkov $CHECKOV_VERSION --framework kubernetes (exit $status)"
    fi
fi

if [ "$failures" -ne 0 ]; then
    printf 'FAIL  validate-manifests: %d step(s) failed\n' "$failures"
    exit 1
fi
printf 'PASS  validate-manifests: all steps passed\n'
