#!/usr/bin/env bash
# flowsim's two set-up commands (README.md):
#   ./dev.sh study   set up .venv, then run the quick study (a Dataset and a figure in out/quickstart)
#   ./dev.sh test    set up .venv, then run the test suite
# Extra arguments go to the study script or to pytest. FLOWSIM_VENV picks another venv folder.
set -euo pipefail
cd "$(dirname "$0")"
venv="${FLOWSIM_VENV:-.venv}"
python="$venv/bin/python"

setup() {
  [ -x "$python" ] || python3 -m venv "$venv"
  # torch: keep one that is already there (users bring their own CUDA build); otherwise the
  # pinned CPU build, which these machines hold on local disk (a plain "torch" pulls CUDA).
  if ! "$python" -c "import torch" 2>/dev/null; then
    "$python" -m pip install --quiet "torch==2.13.0"
  fi
  "$python" -m pip install --quiet -e ".[test,docs]"
}

command="${1:-}"
[ $# -gt 0 ] && shift
case "$command" in
  study)
    setup
    "$python" studies/quickstart.py "$@"
    ;;
  test)
    setup
    status=0
    "$python" -m pytest -q "$@" || status=$?
    if [ "$status" -eq 5 ]; then
      echo "dev.sh: pytest collected no tests; that is a failure" >&2
      exit 1
    fi
    exit "$status"
    ;;
  *)
    echo "usage: ./dev.sh study|test [args...]" >&2
    exit 2
    ;;
esac
