#!/usr/bin/env bash
# The wheels a lent GPU machine lacks for bench/gpu_check.py, downloaded here into wheels/
# (git-ignored), so scripts/gpu_check.sh installs them there with no network.
#
#   scripts/gpu_wheels.sh                        # the default set below, about 5 MB
#   scripts/gpu_wheels.sh peft==0.22.0 NAME==V   # more, or another version of a default (it replaces it)
#
# The machine (/work/.library/device/KINDS.md: nvidia-h100-x1, nvidia-h200) runs Python 3.12 on
# x86-64 with torch 2.11 (CUDA 13), transformers 5.17, accelerate 1.15, tokenizers, safetensors,
# huggingface-hub, pyarrow, pandas, fsspec, xxhash, pyyaml, tqdm, psutil, matplotlib: within
# pyproject.toml's ranges, so they are used as they are. Nothing there reaches a registry, and
# everything that travels with a call (the repository, these wheels) must stay under 64 MiB, so
# only what it lacks or may hold at a version outside our range comes:
#   - pydantic, pydantic-core, annotated-types, typing-inspection: the run config is validated
#     with pydantic, which the image does not have; typing-extensions because this pydantic
#     needs >= 4.16 and the image's version is not known.
#   - datasets, dill, multiprocess: the stages read their data through datasets, which the image
#     does not have (its other needs are there).
#   - peft: the image has one, at a version not known; pyproject.toml bounds it below 0.22
#     (checkpoints use its adapter state-dict functions).
# Not carried: wandb (the check runs with wandb.mode=disabled, and nothing imports it then), trl
# (only bench/ppo_vs_trl.py uses it), deepspeed (no ZeRO on one GPU), and transformers 5.25, the
# version tested here: its wheel needs huggingface-hub >= 2.4 and `kernels`, which the image's
# 1.33 and package list do not meet. The versions are the ones this project's tests pass with.
# Each wheel comes alone (--no-deps): every need above is either in this list or on the image.
set -euo pipefail
cd "$(dirname "$0")/.."

DEFAULTS=(
    pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0
    datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
    peft==0.21.2
)
# One wheel per package: two versions of one stop the whole install there.
name_of() { echo "${1%%[=<>!~]*}" | tr '[:upper:]_' '[:lower:]-'; }
wanted=("$@")
for spec in "${DEFAULTS[@]}"; do
    replaced=no
    for extra in "$@"; do
        [ "$(name_of "$extra")" = "$(name_of "$spec")" ] && replaced=yes
    done
    [ "$replaced" = no ] && wanted+=("$spec")
done

PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
rm -rf wheels
mkdir wheels
# The machine's platform: CPython 3.12, manylinux x86-64 (pip matches each manylinux tag exactly).
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d wheels "${wanted[@]}"

bytes=$(du -sb wheels | cut -f1)
ls -1 wheels
echo "wheels/: $(ls wheels | wc -l) wheels, $((bytes / 1024)) KiB"
# The repository (~6 MB) travels too; leave room under the 64 MiB a call carries.
if [ "$bytes" -gt $((48 * 1024 * 1024)) ]; then
    echo "gpu_wheels: wheels/ is over 48 MiB; with the repository it may not fit the 64 MiB a device call carries" >&2
    exit 1
fi
