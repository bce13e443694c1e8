#!/usr/bin/env bash
# After run.sh: minimises corpus-work/TARGET (what the fuzzer grew, plus the seeds) with `cargo fuzz cmin`, then
# writes the committed corpus/TARGET with cap_corpus.py: the whole minimised set if it fits BUDGET bytes, else the
# deterministic subset that covers the most libFuzzer features per byte.
# Usage: fuzz/cmin.sh TARGET BUDGET_BYTES
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
target=${1:?usage: cmin.sh TARGET BUDGET_BYTES}
budget=${2:?usage: cmin.sh TARGET BUDGET_BYTES}
case $target in
  tokenize) max_len=2048 ;;
  images) max_len=8192 ;;
  *) max_len=4096 ;;
esac
cp -n seeds/"$target"/* corpus-work/"$target"/ 2>/dev/null || true
cargo +nightly fuzz cmin -O -a -s none "$target" corpus-work/"$target" -- \
  -rss_limit_mb=2048 -timeout=30 -max_len="$max_len"
# Features of every minimised input (libFuzzer's merge control file), for the capped selection.
bin=${CARGO_TARGET_DIR:-target}/x86_64-unknown-linux-gnu/release/$target
# The control file stays in corpus-work/ (git-ignored), so that cap_corpus.py can be rerun with another budget.
tmp=$(mktemp -d)
rm -f corpus-work/"$target".control
"$bin" -merge=1 -merge_control_file=corpus-work/"$target".control -rss_limit_mb=2048 -timeout=30 \
  -max_len="$max_len" "$tmp" corpus-work/"$target" 2>corpus-work/"$target".merge.log
rm -rf "$tmp"
python3 cap_corpus.py "$target" "$budget" corpus-work/"$target".control
