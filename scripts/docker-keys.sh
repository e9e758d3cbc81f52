#!/usr/bin/env bash
# Keys for the Docker deployments, taken from this machine's keys directory (created with
# the image's `pichat keygen` if missing), so that clients here (scripts/send_prompt.sh)
# and the containers share them:
#   scripts/docker-keys.sh volume NAME   copy them into the Docker volume NAME (compose)
#   scripts/docker-keys.sh secrets       create the Swarm secrets docker/stack.yml uses
# Env: PICHAT_KEYS (default ~/.config/pichat/keys), IMAGE (default pichat:latest), DOCKER.
set -euo pipefail

keys=${PICHAT_KEYS:-$HOME/.config/pichat/keys}
image=${IMAGE:-pichat:latest}
docker=${DOCKER:-docker}

if [ ! -f "$keys/router.key" ]; then
    echo "creating keys in $keys"
    mkdir -p "$keys"
    $docker run --rm --user "$(id -u):$(id -g)" -v "$keys":/keys "$image" keygen --keys /keys
fi

case "${1:-}" in
volume)
    volume=${2:?usage: $0 volume NAME}
    # Labelled as compose labels its own (NAME is PROJECT_VOLUME), so that `compose up`
    # takes it as the project's volume instead of warning that it exists.
    $docker volume create --label "com.docker.compose.project=${volume%%_*}" \
        --label "com.docker.compose.volume=${volume#*_}" "$volume" >/dev/null
    $docker run --rm --user 0 --entrypoint sh -v "$volume":/keys -v "$keys":/src:ro "$image" \
        -c 'cp -a /src/. /keys/ && chown -R 10001:10001 /keys && chmod -R go-rwx /keys'
    echo "keys from $keys are in volume $volume" ;;
secrets)
    for pair in router.key:router_key router.key_secret:router_key_secret \
                worker.key:worker_key worker.key_secret:worker_key_secret \
                client.key:client_key api-keys:api_keys; do
        file=${pair%%:*}
        secret=pichat_${pair##*:}
        if ! $docker secret inspect "$secret" >/dev/null 2>&1; then
            $docker secret create "$secret" "$keys/$file" >/dev/null
            echo "created secret $secret"
        fi
    done ;;
*) echo "usage: $0 volume NAME | secrets" >&2; exit 2 ;;
esac
