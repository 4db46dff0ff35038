# Sourced by scripts/test.sh and scripts/quickstart.sh: create/activate ./.venv and install the project (editable, with
# the dependencies pyproject.toml lists) once; again when the requirements file or pyproject.toml changes.
ensure_python_env() {
    local requirements="$1"
    if [ -z "${VIRTUAL_ENV:-}" ]; then
        if [ ! -x .venv/bin/python ]; then
            "${PYTHON:-python3}" -m venv .venv
        fi
        # shellcheck disable=SC1091
        source .venv/bin/activate
    fi
    local stamp=".venv-installed-$(basename "$requirements")"
    [ -n "${VIRTUAL_ENV:-}" ] && stamp="$VIRTUAL_ENV/.installed-$(basename "$requirements")"
    if [ ! -f "$stamp" ] || [ "$requirements" -nt "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
        python -m pip install --quiet --upgrade pip
        if ! python -c "import torch" 2>/dev/null; then
            # A plain torch requirement would pull a multi-GB CUDA build; 2.13.0 is the release we test with.
            python -m pip install --quiet "torch==2.13.0"
        fi
        python -m pip install --quiet -r "$requirements"
        touch "$stamp"
    fi
}
