#!/usr/bin/env bash
# Regenerate the README's DCGAN pictures, docs/images/demo_grid.png and docs/images/demo_curves.png, from a fresh
# `make demo` run of the current code and configs/demo.conf: its last grid and its curves, copied as they are.
# Run it after any change to the DCGAN code or the demo preset, and commit the two pictures with that change.
#
#   scripts/update_readme_images.sh                          # about 6 minutes on 2 idle CPU cores
#   DEMO_ARGS="--threads 1" scripts/update_readme_images.sh  # extra train_gan.py flags (a busy machine: one thread)
#
# The run goes to a new folder runs/demo-readme-<date>, so an earlier runs/demo is left alone.
set -euo pipefail
cd "$(dirname "$0")/.."
out="runs/demo-readme-$(date +%Y%m%d-%H%M%S)"
printed=$(make demo GAN_ARGS="--out $out ${DEMO_ARGS:-}")  # progress goes to stderr; stdout ends with the paths
echo "$printed"
grid=$(sed -n 's/^grid: *//p' <<<"$printed")
curves=$(sed -n 's/^curves: *//p' <<<"$printed")
if [[ ! -f "$grid" || ! -f "$curves" ]]; then
    echo "update_readme_images.sh: make demo did not print the paths of its last grid and curves" >&2
    exit 1
fi
cp "$grid" docs/images/demo_grid.png
cp "$curves" docs/images/demo_curves.png
echo "docs/images/demo_grid.png  <- $grid"
echo "docs/images/demo_curves.png <- $curves"
