#!/usr/bin/env bash
# Send one prompt to the pichat router and stream the answer.
#   ./scripts/send_prompt.sh "Hello, how are you?"
#   PICHAT_ROUTER=tcp://pi1:5555 ./scripts/send_prompt.sh "What is a Raspberry Pi?"
# Extra arguments go to `pichat ask` (see `pichat ask --help`), e.g. --stats.
set -euo pipefail
if [ $# -lt 1 ]; then
    echo "usage: $0 \"prompt\" [pichat ask options]" >&2
    exit 2
fi
exec "$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/bin/pichat" ask "$@"
