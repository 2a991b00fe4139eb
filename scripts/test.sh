#!/usr/bin/env bash
# Run the test suite. Uses the active virtualenv, else creates/uses .venv at the repo root.
# Reinstalls the project only when pyproject.toml changed since the last install.
# Extra arguments go to pytest, e.g.: bash scripts/test.sh -k storage -x
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [ -z "${VIRTUAL_ENV:-}" ]; then
    if [ ! -x .venv/bin/python ]; then
        echo "scripts/test.sh: creating .venv" >&2
        python3 -m venv .venv
    fi
    # shellcheck disable=SC1091
    . .venv/bin/activate
fi

stamp="$VIRTUAL_ENV/.step-executor-dev-installed"
want="$(python -c 'import hashlib; print(hashlib.sha256(open("pyproject.toml", "rb").read()).hexdigest())')"
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ] \
    || ! python -c 'import importlib.metadata as m; m.version("step-executor"); m.version("pytest")' 2>/dev/null; then
    echo "scripts/test.sh: installing -e '.[dev]' into $VIRTUAL_ENV" >&2
    python -m pip install --quiet -e '.[dev]'
    echo "$want" > "$stamp"
fi

exec python -m pytest -q -p no:cacheprovider "$@"
