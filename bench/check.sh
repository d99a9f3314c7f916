#!/usr/bin/env bash
# CI smoke test of the asv suite against the installed vaebench (no virtualenv, no results saved):
# `asv check` catches import and parameter errors, then every benchmark runs once on a shrunken
# configuration (VAEBENCH_ASV_QUICK=1). asv exits non-zero if the suite does not import (1) or any
# benchmark, its setup or setup_cache fails (2); skipped parameters (cuda without a GPU) are fine.
#
# Usage: bench/check.sh        (from anywhere; about a minute on 2 CPU cores)
set -euo pipefail
cd "$(dirname "$0")/.."
export VAEBENCH_ASV_QUICK=1
[ -f "${ASV_MACHINE_FILE:-$HOME/.asv-machine.json}" ] || asv machine --yes > /dev/null
asv check --python=same
asv run --python=same --quick --dry-run --show-stderr --durations 5
