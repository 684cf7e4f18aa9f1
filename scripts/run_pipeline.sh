#!/usr/bin/env bash
# The whole pipeline with one command: every stage of CONFIG, in order, each as its own process
# group (accelerate launch / torchrun as the config's `launch` sections say). Stops at the first
# failing stage and names its log; run it again to resume (completed stages are skipped).
#
#   scripts/run_pipeline.sh configs/gpt2-124m-8gpu.yaml [--run-dir runs/gpt2] [--from sft] [--set ...]
set -euo pipefail
if [ $# -lt 1 ]; then
    echo "usage: $0 CONFIG [chatpipe run options...]" >&2
    exit 2
fi
repo="$(cd "$(dirname "$0")/.." && pwd)"
if command -v chatpipe >/dev/null 2>&1; then
    exec chatpipe run "$@"
fi
exec "$repo/.venv/bin/chatpipe" run "$@"
