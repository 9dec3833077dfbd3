#!/usr/bin/env bash
# The classroom lab on a real k3s, step by step with kubectl: import the images, apply the
# manifests, scale out and watch X-Served-By change while the data stays, delete a pod and
# watch its ReplicaSet replace it, stop PostgreSQL and watch readiness (not liveness) react,
# then a container that exceeds its memory limit and is OOM-killed. Every step checks what it
# prints; the first claim that does not hold stops the lab with FAIL and exit 1.
#
# Usage: image/k3s/lab.sh      on the k3s node as root (or with KUBECONFIG pointing at it).
#   QUOTE_URL=http://HOST:30080  where the Service answers (default: the first node's
#                                InternalIP on NodePort 30080).
# Needs: kubectl (or k3s's own `k3s kubectl`), curl, base64.
# Exit: 0 every step held, 1 a step failed, 2 no Kubernetes cluster answers.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
ns=quote-edge
app=app.kubernetes.io/name=quote-service
EXIT_NO_CLUSTER=2

step() { printf '\n=== %s\n' "$*"; }
ok() { printf 'OK    %s\n' "$*"; }
fail() { printf 'FAIL  %s\n' "$*" >&2; exit 1; }
no_cluster() {
    printf '%s\n' "no Kubernetes cluster answers (on quote-edge's build machines k3s cannot be installed: no route to its releases); tests/cluster/run.sh proves the same behaviour on Docker" >&2
    printf '(%s)\n' "$*" >&2
    exit "$EXIT_NO_CLUSTER"
}

# --- 0. A cluster that answers -------------------------------------------------------------
# k3s installs its kubeconfig at /etc/rancher/k3s/k3s.yaml and ships kubectl as `k3s kubectl`.
if [ -z "${KUBECONFIG:-}" ] && [ ! -f "$HOME/.kube/config" ] && [ -r /etc/rancher/k3s/k3s.yaml ]; then
    export KUBECONFIG=/etc/rancher/k3s/k3s.yaml
fi
if command -v kubectl >/dev/null 2>&1; then
    kubectl=(kubectl)
elif command -v k3s >/dev/null 2>&1; then
    kubectl=(k3s kubectl)
else
    no_cluster "neither kubectl nor k3s is installed"
fi
k() { "${kubectl[@]}" "$@"; }
kn() { "${kubectl[@]}" --namespace "$ns" "$@"; }
"${kubectl[@]}" version --request-timeout=5s >/dev/null 2>&1 || no_cluster "'${kubectl[*]} version' reached no API server"
"${kubectl[@]}" get --raw /readyz --request-timeout=5s >/dev/null 2>&1 || no_cluster "the API server's /readyz did not answer ok"
command -v curl >/dev/null 2>&1 || fail "curl is needed to call the Service"
ok "the API server answers: $(k version 2>/dev/null | sed -n 's/^Server Version: //p')"

# --- 1. Images, imported rather than pulled (the cluster is air-gapped) --------------------
step "1. the images are in the node's containerd"
arch=$(k get nodes -o jsonpath='{.items[0].status.nodeInfo.architecture}')
images=(quote-edge/quote-service:0.1.0 quote-edge/postgres:15)
# Every name of every image on the first node (the lab is for a single-node classroom cluster:
# `k3s ctr images import` loads the node it runs on). grep -x >/dev/null, not -q: an early exit
# would kill the pipe under pipefail and count a match as missing.
node_has() { k get nodes -o jsonpath='{.items[0].status.images[*].names[*]}' | tr ' ' '\n' | grep -x "docker.io/$1" >/dev/null; }
missing=()
for image in "${images[@]}"; do node_has "$image" || missing+=("$image"); done
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" -eq 0 ] && command -v k3s >/dev/null 2>&1; then
        for tar in "$root/image/out/quote-service-oci-$arch.tar" "$root/image/out/postgres-oci-$arch.tar"; do
            [ -f "$tar" ] || fail "$tar is missing: build it with image/oci/build.sh $arch and image/oci/build-postgres.sh $arch"
            echo "importing $tar (k3s ctr images import)"
            k3s ctr images import "$tar"
        done
        # The kubelet reports new images with its next node status update.
        for _ in $(seq 60); do
            missing=()
            for image in "${images[@]}"; do node_has "$image" || missing+=("$image"); done
            [ ${#missing[@]} -eq 0 ] && break
            sleep 2
        done
    else
        cat >&2 <<EOF
The node does not have ${missing[*]}. Build the images (image/oci/build.sh $arch and
image/oci/build-postgres.sh $arch), then on the node:
    sudo cp image/out/*-oci-$arch.tar /var/lib/rancher/k3s/agent/images/ && sudo systemctl restart k3s
or, without a restart:
    sudo k3s ctr images import image/out/quote-service-oci-$arch.tar
    sudo k3s ctr images import image/out/postgres-oci-$arch.tar
EOF
    fi
    [ ${#missing[@]} -eq 0 ] || fail "the node still lacks ${missing[*]}"
fi
ok "the node has ${images[*]} (pods use imagePullPolicy IfNotPresent: nothing is pulled)"

# --- 2. Namespace, Secrets, manifests ---------------------------------------------------------
step "2. apply: namespace, generated Secrets, PostgreSQL, quote-service"
k apply -f "$here/00-namespace.yaml"
# The password and the admin token are generated here, once, and never written to the
# repository; re-running the lab keeps the existing ones (PostgreSQL was initialised with it).
secret_dir=$(mktemp -d)
trap 'rm -rf "$secret_dir"' EXIT
random() { head -c 18 /dev/urandom | base64 | tr '+/' '-_'; }
if ! kn get secret quote-db >/dev/null 2>&1; then
    (umask 077; random | tr -d '\n' >"$secret_dir/password")
    kn create secret generic quote-db --from-file=password="$secret_dir/password"
fi
if ! kn get secret quote-admin >/dev/null 2>&1; then
    (umask 077; random | tr -d '\n' >"$secret_dir/token")
    kn create secret generic quote-admin --from-file=token="$secret_dir/token"
fi
token=$(kn get secret quote-admin -o jsonpath='{.data.token}' | base64 -d)
[ -n "$token" ] || fail "the Secret quote-admin has no token"
ok "Secrets quote-db (key password) and quote-admin (key token) exist"
k apply -f "$here/"

step "3. wait for the rollout"
kn rollout status statefulset/postgres --timeout=300s
kn rollout status deployment/quote-service --timeout=300s
ready_count() {
    kn get pods -l "$app" -o jsonpath='{range .items[*]}{.metadata.deletionTimestamp}{" "}{.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}' \
        | grep -c '^ True$' || true
}
wait_ready_count() { # $1 pods, $2 seconds
    local deadline=$((SECONDS + $2))
    while [ "$(ready_count)" -ne "$1" ]; do
        [ "$SECONDS" -lt "$deadline" ] || return 1
        sleep 1
    done
}
wait_ready_count 3 120 || fail "3 quote-service pods are not all Ready: $(ready_count) are"
ok "postgres-0 and 3 quote-service pods are Ready"

url=${QUOTE_URL:-}
if [ -z "$url" ]; then
    ip=$(k get nodes -o jsonpath='{.items[0].status.addresses[?(@.type=="InternalIP")].address}')
    url="http://$ip:30080"
fi
version=$(curl -fsS --max-time 5 "$url/version") || fail "GET $url/version through the Service failed"
ok "the Service answers at $url: $version"

# --- 4. Scale out: the instance changes, the data does not ----------------------------------
step "4. scale to 5: X-Served-By changes while the data stays"
kn scale deployment/quote-service --replicas=5
kn rollout status deployment/quote-service --timeout=180s
wait_ready_count 5 120 || fail "5 quote-service pods are not all Ready: $(ready_count) are"
ok "5 quote-service pods are Ready"
text="Lab quote written at $(date -u +%FT%TZ)"
created=$(curl -fsS --max-time 5 -X POST "$url/quotes" -H "Authorization: Bearer $token" \
    -H 'Content-Type: application/json' -d "{\"text\":\"$text\",\"author\":\"lab.sh\"}") \
    || fail "POST $url/quotes failed"
id=$(printf '%s' "$created" | sed -n 's/.*"id":\([0-9][0-9]*\).*/\1/p')
[ -n "$id" ] || fail "POST answered without an id: $created"
ok "POST /quotes stored quote $id"
pods=$(kn get pods -l "$app" -o jsonpath='{.items[*].metadata.name}')
get_quote() { # prints the replica that answered; fails unless the body holds the quote
    local headers body
    headers=$(mktemp)
    body=$(curl -fsS --max-time 5 -D "$headers" "$url/quotes/$id") || { rm -f "$headers"; return 1; }
    served=$(tr -d '\r' <"$headers" | sed -n 's/^[Xx]-[Ss]erved-[Bb]y: *//p')
    rm -f "$headers"
    case $body in *"$text"*) ;; *) echo "body without the quote: $body" >&2; return 1 ;; esac
    printf '%s\n' "$served"
}
seen=()
for i in $(seq 12); do
    served=$(get_quote) || fail "GET /quotes/$id #$i did not return the quote"
    case " $pods " in *" $served "*) ;; *) fail "X-Served-By '$served' is not one of the pods: $pods" ;; esac
    printf '  GET /quotes/%s #%-2d served by %s\n' "$id" "$i" "$served"
    seen+=("$served")
done
distinct=$(printf '%s\n' "${seen[@]}" | sort -u | wc -l)
[ "$distinct" -ge 2 ] || fail "12 requests were all served by one replica"
ok "12 GETs of quote $id through the Service: the same quote from $distinct different replicas"

# --- 5. Delete a pod: the ReplicaSet replaces it ----------------------------------------------
step "5. delete a pod: its ReplicaSet replaces it"
victim=$(kn get pods -l "$app" -o jsonpath='{.items[0].metadata.name}')
rs=$(kn get pod "$victim" -o jsonpath='{.metadata.ownerReferences[0].name}')
kn delete pod "$victim" --wait=true
wait_ready_count 5 120 || fail "the ReplicaSet did not bring back 5 Ready pods: $(ready_count) are"
after=$(kn get pods -l "$app" -o jsonpath='{.items[*].metadata.name}')
case " $after " in *" $victim "*) fail "$victim still exists" ;; esac
replacement=
for pod in $after; do
    case " $pods " in *" $pod "*) ;; *) replacement=$pod ;; esac
done
[ -n "$replacement" ] || fail "no new pod appeared"
owner=$(kn get pod "$replacement" -o jsonpath='{.metadata.ownerReferences[0].name}')
[ "$owner" = "$rs" ] || fail "$replacement belongs to $owner, not $rs"
get_quote >/dev/null || fail "quote $id is gone after the pod was deleted"
ok "replaced: $victim -> $replacement by ReplicaSet $rs; quote $id still served"

# --- 6. PostgreSQL stops: readiness reacts, liveness does not ---------------------------------
step "6. stop PostgreSQL: pods go NotReady, none restarts"
restarts() { kn get pods -l "$app" -o jsonpath='{range .items[*]}{.metadata.name}={.status.containerStatuses[0].restartCount}{"\n"}{end}' | sort; }
before=$(restarts)
printf '  restart counts before:\n%s\n' "$(printf '%s\n' "$before" | sed 's/^/    /')"
outage_started=$(date -u +%Y-%m-%dT%H:%M:%SZ)
kn scale statefulset/postgres --replicas=0
kn wait --for=delete pod/postgres-0 --timeout=120s
ok "postgres-0 is gone"
kn wait --for=condition=Ready=false pod -l "$app" --timeout=60s
ok "every quote-service pod is NotReady (readiness: /readyz answers 503 while PostgreSQL is away)"
ready_endpoints=$(kn get endpointslices -l kubernetes.io/service-name=quote \
    -o jsonpath='{.items[*].endpoints[?(@.conditions.ready==true)].addresses[*]}')
[ -z "$ready_endpoints" ] || fail "the Service still lists Ready endpoints: $ready_endpoints"
code=0
curl -sS --max-time 5 -o /dev/null "$url/quotes/$id" 2>/dev/null || code=$?
[ "$code" != 0 ] || fail "the Service still answered with no Ready pod behind it"
ok "the Service has no Ready endpoint (EndpointSlice): a request fails to connect (curl exit $code) instead of reaching a replica"
# Liveness runs every 10 s and restarts after 3 failures: 45 s down is past its whole window.
echo "  keeping PostgreSQL down for 45 s (longer than liveness's 3 x 10 s)"
sleep 45
during=$(restarts)
[ "$during" = "$before" ] || fail "restart counts changed while PostgreSQL was down: $during"
phases=$(kn get pods -l "$app" -o jsonpath='{.items[*].status.phase}' | tr ' ' '\n' | sort -u)
[ "$phases" = Running ] || fail "quote-service pods are not all Running: $phases"
# Only this outage's events: those of the current pods, since PostgreSQL was stopped.
liveness=$(kn get events --field-selector reason=Unhealthy \
    -o jsonpath='{range .items[*]}{.involvedObject.name}{" "}{.lastTimestamp}{" "}{.message}{"\n"}{end}' |
    awk -v since="$outage_started" -v pods="$(kn get pods -l "$app" -o jsonpath='{.items[*].metadata.name}')" '
        BEGIN { n = split(pods, p, " "); for (i = 1; i <= n; i++) mine[p[i]] = 1 }
        ($1 in mine) && $2 >= since && $3 == "Liveness" { c++ } END { print c + 0 }')
[ "$liveness" -eq 0 ] || fail "$liveness liveness probe failures recorded"
ok "45 s without PostgreSQL: all pods Running, restart counts unchanged, no liveness failure"
kn scale statefulset/postgres --replicas=1
kn rollout status statefulset/postgres --timeout=300s
wait_ready_count 5 120 || fail "quote-service pods did not come back Ready: $(ready_count) are"
[ "$(restarts)" = "$before" ] || fail "restart counts changed on PostgreSQL's return: $(restarts)"
get_quote >/dev/null || fail "quote $id is gone after PostgreSQL's restart"
ok "PostgreSQL back: 5 pods Ready again without a restart, quote $id survived on the volume"

# --- 7. Requests, limits, and the OOM killer ------------------------------------------------
step "7. requests vs limits: a container past its memory limit is OOM-killed"
kn get pods -l "$app" -o jsonpath='{range .items[*]}{.metadata.name}{"  requests "}{.spec.containers[0].resources.requests}{"  limits "}{.spec.containers[0].resources.limits}{"\n"}{end}'
echo "  usage (metrics-server; may be empty on a cluster without it):"
kn top pods 2>/dev/null | sed 's/^/    /' || true
# quote-service stays at a few MiB and never reaches its 64 MiB: a pod from the postgres image
# (it has a shell) makes `tail` hold 300 MB of a line that never ends, under a 32 MiB limit.
kn delete pod oom-demo --ignore-not-found --wait=true
kn apply -f - <<'EOF'
apiVersion: v1
kind: Pod
metadata:
  name: oom-demo
  namespace: quote-edge
spec:
  restartPolicy: Never
  automountServiceAccountToken: false
  securityContext:
    runAsNonRoot: true
    runAsUser: 999
    runAsGroup: 999
    seccompProfile:
      type: RuntimeDefault
  containers:
    - name: oom
      image: quote-edge/postgres:15
      imagePullPolicy: IfNotPresent
      command: [sh, -c, "head -c 300M /dev/zero | tail"]
      resources:
        requests: {cpu: 50m, memory: 16Mi, ephemeral-storage: 1Mi}
        limits: {cpu: 500m, memory: 32Mi, ephemeral-storage: 16Mi}
      securityContext:
        allowPrivilegeEscalation: false
        readOnlyRootFilesystem: true
        capabilities:
          drop: [ALL]
EOF
kn wait --for=jsonpath='{.status.phase}'=Failed pod/oom-demo --timeout=120s
reason=$(kn get pod oom-demo -o jsonpath='{.status.containerStatuses[0].state.terminated.reason}{.status.containerStatuses[0].lastState.terminated.reason}')
code=$(kn get pod oom-demo -o jsonpath='{.status.containerStatuses[0].state.terminated.exitCode}')
[ "$reason" = OOMKilled ] || fail "oom-demo ended with reason '$reason' (exit $code), not OOMKilled"
ok "oom-demo: terminated, reason OOMKilled, exit code $code: the 32 MiB limit is enforced by the kernel"
kn delete pod oom-demo --wait=false

step "done"
kn scale deployment/quote-service --replicas=3
ok "every step held; scaled back to 3 replicas. Remove the lab with: kubectl delete namespace quote-edge"
