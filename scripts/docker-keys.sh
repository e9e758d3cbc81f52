#!/usr/bin/env bash
# The router's keys for the Docker deployments, taken from this machine's keys directory
# (created with the image's `pichat keygen` if missing), so that clients here
# (scripts/send_prompt.sh) and the router share them. Workers never get them: they join
# with a token (pichat invite / pichat worker --join) and make key pairs of their own.
#   scripts/docker-keys.sh volume NAME [LABEL]   copy the router's keys into the Docker
#                                                volume NAME (compose: pichat_keys)
#   scripts/docker-keys.sh invite NAME USES       print a worker join token made in volume
#                                                NAME (an hour, USES workers)
# LABEL: "compose" (default; NAME is PROJECT_VOLUME) or "stack" (NAME is STACK_VOLUME).
# Env: PICHAT_KEYS (default ~/.config/pichat/keys), IMAGE (default pichat:latest), DOCKER.
set -euo pipefail

keys=${PICHAT_KEYS:-$HOME/.config/pichat/keys}
image=${IMAGE:-pichat:latest}
docker=${DOCKER:-docker}

case "${1:-}" in
volume)
    volume=${2:?usage: $0 volume NAME [compose|stack]}
    if [ ! -f "$keys/router.key" ]; then
        echo "creating keys in $keys"
        mkdir -p "$keys"
        $docker run --rm --user "$(id -u):$(id -g)" -v "$keys":/keys "$image" keygen --keys /keys
    fi
    # Labelled as compose (or a stack) labels its own, so that it is taken as the
    # project's volume instead of warned about.
    if [ "${3:-compose}" = stack ]; then
        labels=(--label "com.docker.stack.namespace=${volume%%_*}")
    else
        labels=(--label "com.docker.compose.project=${volume%%_*}"
                --label "com.docker.compose.volume=${volume#*_}")
    fi
    $docker volume create "${labels[@]}" "$volume" >/dev/null
    # The router's own pair, the allow-lists and the API keys; not the worker's and the
    # client's secret keys (they stay on this machine, for its own clients).
    # shellcheck disable=SC2016  # expanded inside the container
    $docker run --rm --user 0 --entrypoint sh -v "$volume":/keys -v "$keys":/src:ro "$image" \
        -c 'cd /src && for f in *; do
                case "$f" in worker.key_secret|client.key_secret|invites|router.json) ;;
                *) cp -a "$f" /keys/ ;; esac
            done && chown -R 10001:10001 /keys && chmod -R go-rwx /keys'
    echo "the router's keys from $keys are in volume $volume" >&2 ;;
invite)
    volume=${2:?usage: $0 invite NAME USES}
    $docker run --rm -v "$volume":/keys "$image" invite --keys /keys --role worker \
        --ttl 3600 --uses "${3:?usage: $0 invite NAME USES}" --address tcp://router:5557 ;;
*) echo "usage: $0 volume NAME [compose|stack] | invite NAME USES" >&2; exit 2 ;;
esac
