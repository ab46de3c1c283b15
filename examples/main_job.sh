#!/usr/bin/env bash
# The main job on the bundled example checkpoints: inspect a decoder and a vision tower, fuse
# them, prove the fused model computes exactly what the decoder computed, generate a few tokens
# with it, take the decoder back out bit for bit, and run a fused model's life in Python
# (train, save, validate, unfuse).
# The push step is a dry run: it prints the files and the model card, with no network.
set -euo pipefail
cd "$(dirname "$0")/.."
fs=.venv/bin/fusesurgery
out=out/examples
step() { printf '\n\033[1m$ %s\033[0m\n' "$*" >&2; "$@"; }

step $fs inspect examples/tiny-llama
step $fs inspect examples/tiny-clip-vision
step $fs fuse examples/tiny-clip-vision examples/tiny-llama -o $out/fused --every 2 --overwrite
step $fs inspect $out/fused
step $fs validate $out/fused --against examples/tiny-llama
step $fs generate $out/fused --prompt "word7 word8" --max-new-tokens 8
step $fs push $out/fused my-org/my-vlm --dry-run --quick
step $fs unfuse $out/fused -o $out/tiny-llama-unfused --overwrite
step $fs diff examples/tiny-llama $out/tiny-llama-unfused --values
step cmp examples/tiny-llama/model.safetensors $out/tiny-llama-unfused/model.safetensors
step $fs convert examples/tiny-llama -o $out/tiny-llama-native --overwrite
step $fs diff examples/tiny-llama $out/tiny-llama-native --values
step .venv/bin/python examples/lifecycle.py $out/lifecycle
