#!/usr/bin/env bash
# A fingerprint of the source the GPU check runs: sha256 over the paths and contents of every .py, .cu, .cuh, .h,
# .cpp and .sh file under gainrl_kernels/, gainrl/, csrc/, bench/ and tests/ (C-locale path order), first 12 hex.
#
#     bash bench/source_fingerprint.sh            # the files in the working tree (what bench/gpu_check.sh prints)
#     bash bench/source_fingerprint.sh COMMIT     # the same files as committed at COMMIT
#
# The device machine gets a copy of the working tree whose .git may lag it, so `git rev-parse HEAD` there can name
# an older commit; the fingerprint names the code itself: match it against this script's output at a commit here.
set -euo pipefail
cd "$(dirname "$0")/.."
DIRS=(gainrl_kernels gainrl csrc bench tests)
PATTERN='\.(py|cu|cuh|h|cpp|sh)$'
if [ $# -ge 1 ]; then
    commit=$1
    git ls-tree -r --name-only "$commit" -- "${DIRS[@]}" | grep -E "$PATTERN" | LC_ALL=C sort | while read -r f; do
        printf '%s\n' "$f"
        git show "$commit:$f"
    done | sha256sum | cut -c1-12
else
    find "${DIRS[@]}" -type f 2>/dev/null | grep -E "$PATTERN" | grep -v '/__pycache__/' | LC_ALL=C sort | while read -r f; do
        printf '%s\n' "$f"
        cat "$f"
    done | sha256sum | cut -c1-12
fi
