#!/usr/bin/env bash
# Makes the folders gpu-session.sh needs carried to the device machine, in the
# repo root of this (host) machine: .whl, .whl/ref, .reference, .data, .old.
# Usage: bash docs/perf/prepare-carry.sh EAGLE_GIT_DIR
# EAGLE_GIT_DIR: a git directory of SafeAILab/EAGLE holding cb7e084 (the
# workplace's `fetch github:SafeAILab/EAGLE` prints one). The folders are kept
# out of git through .git/info/exclude; together about 31 MiB, so the carry with
# the working tree stays under the device's 64 MiB.
set -eu
eagle_git=${1:?usage: prepare-carry.sh EAGLE_GIT_DIR}
cd "$(git rev-parse --show-toplevel)"
exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
for folder in /.whl/ /.reference/ /.data/ /.old/; do
    grep -qxF "$folder" "$exclude" 2>/dev/null || echo "$folder" >>"$exclude"
done

# Wheels for the device's Python 3.12; its image has every other need of these
# (KINDS.md lists huggingface_hub 1.33 and tokenizers 0.23.2 for transformers 5.23).
download() {
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 "$@"
}
rm -rf .whl && mkdir -p .whl/ref
download -d .whl transformers==5.23.0
# The reference engine needs transformers 4.53, which needs the older hub and tokenizers.
download -d .whl/ref transformers==4.53.3 tokenizers==0.21.4 huggingface_hub==0.34.4

# The reference's eagle/ folder only: the repository's figures would break the size limit.
rm -rf .reference && mkdir .reference
# (the subtree itself: archiving the path from the root reads the figures the mirror lacks)
git --git-dir "$eagle_git" archive --prefix=eagle/ cb7e084:eagle | tar -x -C .reference

rm -rf .data && cp -r ../shared/data .data

# Stage 9 times the engine of 49cfdc3 side by side; the demo's weights are not read there.
rm -rf .old && mkdir .old
git archive 49cfdc3 eagle_gto | tar -x -C .old
rm -r .old/eagle_gto/demo/assets

du -sh .whl .reference .data .old
