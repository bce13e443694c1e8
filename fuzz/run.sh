#!/usr/bin/env bash
# Runs one fuzz target the way the figures in STATS.md were taken: one process, at most 1M executions or 30
# minutes, final statistics printed (-print_final_stats=1). New inputs go into corpus-work/TARGET (git-ignored),
# which starts as a copy of the committed corpus/TARGET; the seeds (make_seeds.py) and the regression inputs are
# read too. Afterwards `cmin.sh TARGET` minimises corpus-work/TARGET back into corpus/TARGET.
# Usage: fuzz/run.sh tokenize|request|configs|npy|images [more libFuzzer options, e.g. -max_total_time=60]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
target=${1:?usage: run.sh tokenize|request|configs|npy|images [libFuzzer options]}
shift
case $target in
  tokenize) max_len=2048 ;;
  images) max_len=8192 ;;
  *) max_len=4096 ;;
esac
[ -d seeds/"$target" ] || python3 make_seeds.py "$target"
mkdir -p corpus/"$target" corpus-work/"$target" regressions/"$target"
cp -n corpus/"$target"/* corpus-work/"$target"/ 2>/dev/null || true
# Safe Rust: no sanitizer (3x the executions of ASan on the tokenizers), but overflow checks and debug assertions on.
exec cargo +nightly fuzz run -O -a -s none "$target" corpus-work/"$target" seeds/"$target" regressions/"$target" -- \
  -max_total_time=1800 -runs=1000000 -rss_limit_mb=2048 -timeout=30 -max_len="$max_len" -print_final_stats=1 "$@"
