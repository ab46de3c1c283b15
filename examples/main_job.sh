#!/usr/bin/env bash
# The main job on the bundled example checkpoints: inspect a decoder and a vision tower,
# convert the decoder to the native layout and prove the conversion lossless, then fuse tiny
# models and prove the fused model computes what the decoder computed.
set -euo pipefail
cd "$(dirname "$0")/.."
fs=.venv/bin/fusesurgery
out=out/examples
step() { printf '\n\033[1m$ %s\033[0m\n' "$*" >&2; "$@"; }

step $fs inspect examples/tiny-llama
step $fs inspect examples/tiny-clip-vision
step $fs convert examples/tiny-llama -o $out/tiny-llama-native --overwrite
step $fs diff examples/tiny-llama $out/tiny-llama-native --values
step $fs demo
