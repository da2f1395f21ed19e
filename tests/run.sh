#!/bin/sh
# The project's one test command: finds uv (or installs it into a throwaway
# venv under build/, leaving the user's Python untouched), then the locked test
# dependencies, then runs pytest with its temp dirs under build/ (removed after).
#   sh tests/run.sh [pytest args]
set -eu
cd "$(dirname "$0")/.."

find_uv() {
    if command -v uv >/dev/null 2>&1; then command -v uv; return 0; fi
    for candidate in "$HOME/.local/bin/uv" "$HOME/.cargo/bin/uv" build/uv-venv/bin/uv; do
        if [ -x "$candidate" ]; then echo "$candidate"; return 0; fi
    done
    return 1
}

if ! UV=$(find_uv); then
    echo "tests/run.sh: installing uv into build/uv-venv (python3 -m venv; pip install uv)" >&2
    python3 -m venv build/uv-venv
    build/uv-venv/bin/python -m pip install --quiet uv
    UV=build/uv-venv/bin/uv
fi

# pytest keeps its per-test dirs in basetemp; a private one under build/ goes
# away when the run ends instead of piling up in /tmp/pytest-of-$USER.
mkdir -p build
BASETEMP=$(mktemp -d "$PWD/build/pytest.XXXXXX")
trap 'rm -rf "$BASETEMP"' EXIT INT TERM
status=0
"$UV" run --locked --extra test pytest --basetemp="$BASETEMP" "$@" || status=$?
exit "$status"
