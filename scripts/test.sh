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

# --- the tests ------------------------------------------------------------------------------------
M40LLM_REQUIRE_TESTDATA=1 cargo test --release --all-features "$@"
