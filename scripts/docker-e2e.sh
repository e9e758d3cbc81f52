#!/usr/bin/env bash
# The Docker paths end to end (`make docker-e2e`; needs root where no engine runs):
#   1. a Docker engine (started here if none answers; stopped again at the end)
#   2. base images: pulled if a registry answers, else made locally with debootstrap
#   3. `make build` (offline: --network none), then `make up` with two workers, which join
#      with a token (each its own key pair; no file or variable of theirs holds the
#      router's secret key)
#   4. a prompt through scripts/send_prompt.sh; both workers SIGKILLed and started again:
#      each takes a state directory of its own and a conversation is still warm; kill one
#      worker; a second prompt
#   5. `make down`; then a one-node Swarm, `make swarm-deploy`, a prompt, `make swarm-rm`
#   6. the HA stack (`make swarm-deploy HA=1`): two routers on etcd (three members), a
#      conversation kept through one and listed through the other, HTTP through the
#      second; the first router's task killed: a prompt answered, the conversation
#      continued, and Swarm's restarted router gets the worker back
# The workers' model volume is seeded from this machine's model cache (no download).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
pichat=.venv/bin/pichat
models=${PICHAT_MODEL_DIR:-$HOME/.cache/pichat/models}
port=${PICHAT_E2E_PORT:-15555}
started_engine=""
swarm_started=""

step() { printf '\n== %s\n' "$*"; }
fail() { echo "FAIL: $*" >&2; exit 1; }

cleanup() {
    set +e
    step "cleaning up"
    PICHAT_PUBLISH="127.0.0.1:$port" scripts/compose.sh -f docker/compose.yml down --volumes >/dev/null 2>&1
    docker stack rm pichat-e2e pichat-ha >/dev/null 2>&1
    for _ in $(seq 30); do [ -z "$(docker ps -q --filter label=com.docker.stack.namespace)" ] && break; sleep 1; done
    [ -n "$swarm_started" ] && docker swarm leave --force >/dev/null 2>&1
    docker volume rm pichat_models pichat-e2e_models pichat-e2e_router-keys \
        pichat-e2e_worker-keys pichat-ha_models pichat-ha_router-keys pichat-ha_router2-keys \
        pichat-ha_worker-keys pichat-ha_etcd1-data pichat-ha_etcd2-data \
        pichat-ha_etcd3-data >/dev/null 2>&1
    if [ -n "$started_engine" ]; then scripts/docker-engine.sh stop; fi
}
trap cleanup EXIT

step "Docker engine"
docker info >/dev/null 2>&1 || started_engine=yes
DOCKER_HOST=$(scripts/docker-engine.sh start)
export DOCKER_HOST
docker version --format 'client {{.Client.Version}}, server {{.Server.Version}}'

step "base images"
base=${BASE_IMAGE:-python:3.11-slim-bookworm}
build=${BUILD_IMAGE:-$base}
if ! docker image inspect "$base" >/dev/null 2>&1 && ! timeout 30 docker pull "$base" >/dev/null 2>&1; then
    echo "no registry answers: making local base images with debootstrap"
    scripts/docker-base-image.sh linux/amd64
    base=local/debian-py:bookworm
    build=local/debian-py-build:bookworm
fi
echo "base $base, build $build"

step "make build"
make --no-print-directory build BASE_IMAGE="$base" BUILD_IMAGE="$build" DOCKER_BUILD_ARGS="--network none"

seed_volume() {  # volume: copy this machine's verified model into it
    # (labelled as compose labels its own, PROJECT_VOLUME, so `compose up` adopts it quietly)
    docker volume create --label "com.docker.compose.project=${1%%_*}" \
        --label "com.docker.compose.volume=${1#*_}" "$1" >/dev/null
    docker run --rm --user 0 --entrypoint sh -v "$1":/models -v "$models":/src:ro pichat:latest \
        -c 'cp -a /src/*.gguf /src/*.sha256.json /models/ && chown -R 10001:10001 /models'
}

wait_workers() {  # endpoint, count
    for _ in $(seq 180); do
        n=$($pichat status --router "$1" --json 2>/dev/null | python3 -c 'import json,sys; print(len(json.load(sys.stdin)["workers"]))' 2>/dev/null || echo 0)
        [ "$n" -ge "$2" ] && return 0
        sleep 1
    done
    return 1
}

ask() {  # endpoint, prompt: prints the answer, fails if empty
    local answer
    answer=$(PICHAT_ROUTER="$1" ./scripts/send_prompt.sh "$2" --max-tokens 60 --temperature 0 --stats)
    echo "$answer"
    [ -n "$(echo "$answer" | tr -d '[:space:]')" ] || fail "empty answer to: $2"
}

step "make up (compose: router + 2 workers)"
seed_volume pichat_models
PICHAT_PUBLISH="127.0.0.1:$port" make --no-print-directory up
endpoint="tcp://127.0.0.1:$port"
wait_workers "$endpoint" 2 || { scripts/compose.sh -f docker/compose.yml logs; fail "workers did not register"; }
$pichat status --router "$endpoint"

step "the workers joined, each with keys of its own, and hold no other secret"
keys_dir=${PICHAT_KEYS:-$HOME/.config/pichat/keys}
secret_of() { sed -n 's/.*secret-key = "\(.*\)"/\1/p' "$1"; }
router_secret=$(secret_of "$keys_dir/router.key_secret")
client_secret=$(secret_of "$keys_dir/client.key_secret")
holds_no_secret() {  # container: no file under /keys or /join, nor its environment
    for s in "$router_secret" "$client_secret"; do
        ! docker exec "$1" grep -rqF -- "$s" /keys /join 2>/dev/null || return 1
        ! docker exec "$1" env | grep -qF -- "$s" || return 1
    done
}
for c in $(scripts/compose.sh -f docker/compose.yml ps -q worker); do
    holds_no_secret "$c" || fail "worker $c holds a secret key that is not its own"
done
# The replicas share the worker-keys volume, one directory (and key pair) each.
pairs=$(docker exec "$c" sh -c 'cat /keys/*/worker.key' | grep 'public-key' | sort -u | wc -l)
[ "$pairs" -ge 2 ] || fail "the replicas do not hold key pairs of their own"
docker run --rm -v pichat_keys:/keys:ro pichat:latest keys list --keys /keys

step "a prompt"
ask "$endpoint" "Hello, how are you?"

step "both workers SIGKILLed and started again: a conversation is warm from disk"
cached() {  # endpoint, session: the cached prompt tokens of one greedy turn
    PICHAT_ROUTER="$1" ./scripts/send_prompt.sh "Tell me one fact about the Moon." \
        --session "$2" --max-tokens 16 --temperature 0 --json |
        python3 -c 'import json,sys; print(json.load(sys.stdin)["usage"]["cached_tokens"])'
}
workers_where() {  # endpoint, python condition on a worker `w`: how many match
    $pichat status --router "$1" --json 2>/dev/null | python3 -c "import json,sys
print(sum(1 for w in json.load(sys.stdin)['workers'] if $2))" 2>/dev/null || echo 0
}
first=$(cached "$endpoint" e2e-warm)
for _ in $(seq 30); do  # the state is written behind the answer: until a heartbeat says so
    [ "$(workers_where "$endpoint" 'w["memory"]["disk_states"] > 0')" -ge 1 ] && break
    sleep 1
done
before=$($pichat status --router "$endpoint" --json | python3 -c 'import json,sys; print(" ".join(w["id"] for w in json.load(sys.stdin)["workers"]))')
scripts/compose.sh -f docker/compose.yml kill worker >/dev/null
scripts/compose.sh -f docker/compose.yml start worker >/dev/null
fresh="w['id'] not in '$before'.split()"
for _ in $(seq 90); do  # until both are back (registered afresh) and the dead ones dropped
    [ "$(workers_where "$endpoint" "$fresh")" -ge 2 ] &&
        [ "$(workers_where "$endpoint" True)" -eq 2 ] && break
    sleep 1
done
[ "$(workers_where "$endpoint" "$fresh")" -ge 2 ] || fail "workers did not come back"
dirs=$(for c in $(scripts/compose.sh -f docker/compose.yml ps -q worker); do
    docker exec "$c" sh -c 'for d in /state/*/; do [ -f "$d/.lock" ] && echo "$d"; done'
done | sort -u | wc -l)
[ "$dirs" -ge 2 ] || fail "the replicas did not take a state directory each"
for c in $(scripts/compose.sh -f docker/compose.yml ps -q worker); do  # a restart: no new join
    [ "$(docker logs "$c" 2>&1 | grep -c 'joined the cluster')" -eq 1 ] ||
        fail "worker $c joined again after its restart"
done
again=$(cached "$endpoint" e2e-warm)
echo "cached prompt tokens: first turn $first, the same turn after the restart $again"
[ "$again" -gt "$first" ] || fail "the conversation was not warm after the restart"

step "kill one worker; the other answers"
victim=$(scripts/compose.sh -f docker/compose.yml ps -q worker | sed -n 1p)  # not head: SIGPIPE
docker kill "$victim" >/dev/null
ask "$endpoint" "What is the capital of France?"
$pichat status --router "$endpoint"

step "health checks"
for c in $(scripts/compose.sh -f docker/compose.yml ps -q); do
    docker exec "$c" pichat health || fail "container $c is not healthy"
done

step "make down"
PICHAT_PUBLISH="127.0.0.1:$port" make --no-print-directory down

step "Swarm (one node)"
if [ "$(docker info --format '{{.Swarm.LocalNodeState}}')" != active ]; then
    docker swarm init --advertise-addr 127.0.0.1 >/dev/null
    swarm_started=yes
fi
seed_volume pichat-e2e_models
PICHAT_PUBLISH_PORT=$port make --no-print-directory swarm-deploy STACK=pichat-e2e
wait_workers "$endpoint" 1 || { docker service ps pichat-e2e_router pichat-e2e_worker --no-trunc; docker service logs pichat-e2e_worker; fail "swarm worker did not register"; }
$pichat status --router "$endpoint"
for c in $(docker ps -q --filter label=com.docker.swarm.service.name=pichat-e2e_worker); do
    holds_no_secret "$c" || fail "swarm worker $c holds a secret key that is not its own"
done
docker service ps pichat-e2e_worker
docker service logs pichat-e2e_worker 2>&1 | grep 'joined the cluster' ||
    fail "the swarm worker did not join"
ask "$endpoint" "Name one planet."
make --no-print-directory swarm-rm STACK=pichat-e2e

step "Swarm HA (one node): two routers on etcd; one router's task killed, the other answers"
etcd_image=${PICHAT_ETCD_IMAGE:-quay.io/coreos/etcd:v3.5.17}
if ! docker image inspect "$etcd_image" >/dev/null 2>&1 &&
        ! timeout 60 docker pull "$etcd_image" >/dev/null 2>&1; then
    # No registry: this machine's etcd (Debian's etcd-server) on the local base image.
    command -v etcd >/dev/null || fail "no etcd image and no etcd here (apt-get install etcd-server)"
    ctx=$(mktemp -d)
    cp "$(command -v etcd)" "$ctx/etcd"
    printf 'FROM %s\nCOPY etcd /usr/local/bin/etcd\nRUN mkdir /data && chown 10001 /data\nUSER 10001\n' \
        "$base" > "$ctx/Dockerfile"
    etcd_image=local/etcd:e2e
    docker build -q --network none -t "$etcd_image" "$ctx" >/dev/null
    rm -rf "$ctx"
fi
echo "etcd image: $etcd_image"
ha_port=$((port + 10))
ep1="tcp://127.0.0.1:$ha_port" ep2="tcp://127.0.0.1:$((ha_port + 1))"
http2="http://127.0.0.1:$((ha_port + 3))"
seed_volume pichat-ha_models
PICHAT_PUBLISH_PORT=$ha_port PICHAT_PUBLISH2_PORT=$((ha_port + 1)) \
    PICHAT_PUBLISH_HTTP_PORT=$((ha_port + 2)) PICHAT_PUBLISH2_HTTP_PORT=$((ha_port + 3)) \
    PICHAT_ETCD_IMAGE=$etcd_image make --no-print-directory swarm-deploy STACK=pichat-ha HA=1
if ! wait_workers "$ep1" 1 || ! wait_workers "$ep2" 1; then
    docker service ls
    for s in router router2 worker etcd1; do docker service logs --tail 20 "pichat-ha_$s" 2>&1; done
    fail "the worker did not register with both routers"
fi
$pichat status --router "$ep1,$ep2"
echo "My name is Ada. Say hi." | $pichat chat --router "$ep1" --conversation "swarm ha" \
    --max-tokens 16 --temperature 0 || fail "no chat turn through the first router"
$pichat conversations list --router "$ep2" | grep -q "swarm ha" ||
    fail "the conversation kept through the first router is not listed through the second"
key=$(grep -v '^#' "$keys_dir/api-keys" | awk 'NF {print $1; exit}')
curl -sf -m 120 "$http2/v1/chat/completions" -H "Authorization: Bearer $key" \
    -H 'Content-Type: application/json' \
    -d '{"model": "default", "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8}' |
    python3 -c 'import json,sys; print("HTTP through router2:", json.load(sys.stdin)["choices"][0]["message"]["content"])' ||
    fail "no HTTP answer through the second router"
first=$(docker ps -q --filter label=com.docker.swarm.service.name=pichat-ha_router)
[ -n "$first" ] || fail "no task of the first router"
t0=$(date +%s.%N)
docker kill "$first" >/dev/null
ask "$ep1,$ep2" "Name one planet."
echo "answered $(python3 -c "import sys,time; print(f'{time.time() - float(sys.argv[1]):.2f}')" "$t0")s after the first router's task was killed"
echo "What is my name?" | $pichat chat --router "$ep1,$ep2" --conversation "swarm ha" \
    --max-tokens 16 --temperature 0 || fail "the conversation cannot be continued"
wait_workers "$ep1" 1 || fail "the restarted first router did not get the worker back"
echo "Swarm restarted the first router; the worker registered with it again"
$pichat status --router "$ep1,$ep2"
make --no-print-directory swarm-rm STACK=pichat-ha

step "docker-e2e passed"
