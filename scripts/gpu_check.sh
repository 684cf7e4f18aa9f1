#!/usr/bin/env bash
# The GPU check on a lent GPU machine, in one command: install the carried wheels with no
# network, say what the machine has, run bench/gpu_check.py, keep what comes back.
#
#   bash scripts/gpu_check.sh [bench/gpu_check.py flags, e.g. --budget 420 --phases pretrain,ppo]
#
# Needs wheels/ from scripts/gpu_wheels.sh (run here first; the device call carries it). Results
# go to $OUT (the folder a device call brings back) or bench/results/ where OUT is unset:
# gpu_check.jsonl, gpu_check.log, nvidia_smi.txt, and the demo's manifest.json and stage logs.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-bench/results}
mkdir -p "$out"
site=/tmp/chatpipe-site
demo=/tmp/gpu-check-demo

if ! ls wheels/*.whl >/dev/null 2>&1; then
    echo "gpu_check.sh: no wheels/ here; run scripts/gpu_wheels.sh where there is a network, and carry wheels" >&2
    exit 3
fi
# --target: the image's own packages stay as they are; ours come first on the path.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" wheels/*.whl || exit 3
export PYTHONPATH="$site:$PWD" PYTHONUNBUFFERED=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false

nvidia-smi >"$out/nvidia_smi.txt" 2>&1
python3 - <<'EOF' 2>&1 | tee "$out/gpu_check.log"
import importlib
for name in ("torch", "transformers", "accelerate", "peft", "datasets", "pydantic", "tokenizers", "safetensors", "huggingface_hub", "triton"):
    try:
        module = importlib.import_module(name)
        print(f"{name} {getattr(module, '__version__', '?')} {module.__file__}")
    except Exception as error:  # a missing one is reported, and the check says which phase it stops
        print(f"{name}: {type(error).__name__}: {error}")
EOF

python3 bench/gpu_check.py --output "$out/gpu_check.jsonl" --run-dir "$demo" "$@" 2>&1 | tee -a "$out/gpu_check.log"
status=${PIPESTATUS[0]}
[ -f "$demo/manifest.json" ] && cp "$demo/manifest.json" "$out/demo_manifest.json"
[ -d "$demo/logs" ] && tar -czf "$out/demo_logs.tar.gz" -C "$demo" logs
exit "$status"
