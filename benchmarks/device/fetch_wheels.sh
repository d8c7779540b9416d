#!/usr/bin/env bash
# Run HERE (a machine with the package registries), before a device session: downloads the wheels of
# benchmarks/device/wheels.txt for the device machine's Python 3.12 into .device/wheels-a and .device/wheels-b, and
# copies the peer baseline into .device/bench. `.device/` is git-ignored; name the folders in the run's `carry`.
set -euo pipefail
cd "$(dirname "$0")/../.."
shared=${1:-../shared}
platforms=(--platform any)
for tag in manylinux_2_{17,24,27,28,31,34,35}_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$tag")
done
group=""
while read -r line; do
  line=${line%%#*}; line=${line// /}
  [ -z "$line" ] && continue
  if [[ $line == \[*\] ]]; then group=${line:1:-1}; mkdir -p ".device/wheels-$group"; continue; fi
  dest=".device/wheels-$group"
  if [[ $line == antlr4-python3-runtime==* ]]; then  # published as a pure-Python sdist only: built here
    python3 -m pip wheel -q --no-deps -w "$dest" "$line"
  else
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      "${platforms[@]}" -d "$dest" "$line"
  fi
done < benchmarks/device/wheels.txt
mkdir -p .device/bench
cp "$shared/bench/peer_qlora_baseline.py" .device/bench/
du -sh .device/wheels-* .device/bench
