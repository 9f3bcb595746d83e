#!/bin/sh
# The load-test kit in one command: build the release binaries, then run every phase.
#   loadtest/run.sh                     every phase (10 to 20 minutes, the WAN phase about 3 of them)
#   loadtest/run.sh --quick --skip wan  smoke run (about 2 minutes)
# Options are passed to loadtest/run.py (see --help). Loopback only; needs taskset, python3,
# and nginx for the nginx-hop reference (apt-get install nginx-light).
set -eu
cd "$(dirname "$0")/.."
cargo build --release --bin credyt-proxy --example floor --example loadgen
exec python3 loadtest/run.py "$@"
