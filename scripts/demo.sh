#!/usr/bin/env bash
# The main job on built-in data. Grows with the pipeline: for now it prints the model table.
set -euo pipefail
OUT=${1:-demo_out}
mkdir -p "$OUT"
asym3d models
