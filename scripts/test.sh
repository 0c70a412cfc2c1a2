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
