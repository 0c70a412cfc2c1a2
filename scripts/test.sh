#!/usr/bin/env bash
# The test command (README, .ci/run): fetch the data the tests need into git-ignored folders,
# then run every test with M40LLM_REQUIRE_TESTDATA=1, so a missing file fails instead of
# skipping. Extra arguments go to `cargo test` (e.g. `bash scripts/test.sh --test gguf_hostile`).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# --- fetched test data: one step per data set ----------------------------------------------------
# The default model, SmolLM2-135M-Instruct Q4_1 (98 MB from PyPI, sha256-checked; a no-op when it
# is present and intact). `fetch` prints the model's path. Built with the tests' features
# (test-support included), so the library is compiled once for both.
model=$(cargo run --release --all-features --quiet -- fetch)
export M40LLM_TEST_MODEL="${M40LLM_TEST_MODEL:-$model}"

# llama.cpp's vocabulary test files and chat templates (from the llama-cpp-python sdist on PyPI,
# sha256-checked) into .cache/vocab and .cache/templates.
bash scripts/fetch-testdata.sh

# Graphviz renders the DOT plan in tests/cli_compile.rs. Installed here when missing and we can
# (apt-get as root); without it the DOT is still checked by a parser and only the rendering is
# skipped, with a printed reason (CI sets M40LLM_REQUIRE_GRAPHVIZ=1, which makes it a failure).
if ! command -v dot >/dev/null 2>&1; then
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "installing Graphviz (for the DOT rendering test)" >&2
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq graphviz; } >&2 ||
            echo "could not install Graphviz: the DOT rendering test will skip" >&2
    else
        echo "Graphviz \`dot\` is missing (and cannot be installed without root and apt-get): the DOT rendering test will skip" >&2
    fi
fi

# The official `openai` Python client (pinned) for tests/server.rs's client test, installed into
# .cache/python (git-ignored; --target needs no virtualenv and no system site-packages).
OPENAI_VERSION=3.51.0
if ! PYTHONPATH=.cache/python "${PYTHON:-python3}" -c \
    "import openai, sys; sys.exit(openai.__version__ != '$OPENAI_VERSION')" 2>/dev/null; then
    "${PYTHON:-python3}" -m pip install --quiet --disable-pip-version-check --upgrade \
        --target .cache/python "openai==$OPENAI_VERSION"
fi

# --- the tests ------------------------------------------------------------------------------------
M40LLM_REQUIRE_TESTDATA=1 cargo test --release --all-features "$@"
