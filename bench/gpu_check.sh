#!/usr/bin/env bash
# The one-shot GPU check (bench/gpu_check.py). A GPU machine may reach no package registry: wheels
# of what is missing there can be carried beside the checkout in .whl/ (made where pip works with
# `pip download --only-binary=:all: -d .whl <package>==<version>`); they are installed into a
# private folder first. Arguments go to gpu_check.py (--dry-run, --steps N, --peak-tflops X).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
if ! python3 -c "import deepspeed, diffusers" 2>/dev/null; then
  if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/gpu_check_site .whl/*.whl
    export PYTHONPATH=/tmp/gpu_check_site${PYTHONPATH:+:$PYTHONPATH}
  else
    echo "gpu_check: deepspeed/diffusers are not installed and no wheels are in .whl/; pip install -r requirements.txt" >&2
    exit 2
  fi
fi
exec python3 bench/gpu_check.py "$@"
