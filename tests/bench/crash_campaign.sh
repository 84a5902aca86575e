#!/bin/sh
# The long crash campaign for over-the-air updates: power cut (abort at each named step, then
# SIGKILL at random instants) N times across download, verify, stage, self-test, activation
# and health window, checking after each that the box restarts into the old or the new
# version and finishes. The test suite runs 50; this runs 1,000 by default (about 40 min).
#   tests/bench/crash_campaign.sh [N]
set -eu
cd "$(dirname "$0")/../.."
TERN_CRASH_POINTS="${1:-1000}" TERN_TEST_STRICT=1 exec cargo test -p tern-tests --test e2e -- \
    --exact updates::power_cut_at_50_points_leaves_old_or_new_and_the_restart_finishes --nocapture
