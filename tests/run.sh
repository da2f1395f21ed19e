#!/bin/sh
# The project's one test command: installs uv if needed, then the locked test
# dependencies, then runs pytest. Works on a machine with only python3 and git.
#   sh tests/run.sh [pytest args]
set -eu
cd "$(dirname "$0")/.."

find_uv() {
    if command -v uv >/dev/null 2>&1; then command -v uv; return 0; fi
    for candidate in "$HOME/.local/bin/uv" "$HOME/.cargo/bin/uv"; do
        if [ -x "$candidate" ]; then echo "$candidate"; return 0; fi
    done
    return 1
}

if ! UV=$(find_uv); then
    echo "tests/run.sh: installing uv for this user (python3 -m pip install --user uv)" >&2
    python3 -m pip install --quiet --user uv 2>/dev/null \
        || PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install --quiet --user uv
    UV=$(find_uv) || UV="$(python3 -m site --user-base)/bin/uv"
fi

exec "$UV" run --locked --extra test pytest "$@"
