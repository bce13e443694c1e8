#!/usr/bin/env bash
# Waits up to $1 seconds for the build jobs of build_sd3m.sh, printing progress; exits 0 when all are done.
limit=${1:-500}
TAG=${BUILD_TAG:+$BUILD_TAG-}  # build_sd3m.sh's BUILD_TAG
t0=$(date +%s)
while :; do
  n=$(ls /tmp/build-${TAG}{t5,transformer,dynamo}.done 2>/dev/null | wc -l)
  [ "$n" -ge 3 ] && break
  [ $(( $(date +%s) - t0 )) -ge "$limit" ] && { echo "still running after ${limit}s ($n/3 done)"; break; }
  sleep 10
done
for f in /tmp/build-${TAG}t5.log /tmp/build-${TAG}transformer.log /tmp/build-${TAG}dynamo.log; do
  echo "== $f"; grep -E "exporting|wrote|Error|error|exit|Killed|memory" "$f" | tail -12
done
free -g | head -2; du -sh /tmp/sd3m/* /tmp/sd3m-dyn/* 2>/dev/null
