#!/bin/sh
# The pytest part of `make test`, in two processes side by side: the testbed
# scenarios (tests/testbed/test_scenarios.py: one guest through scenarios 1 to 9
# and the update server on its fixed port, about 40 minutes) in the background,
# every other test (host tests and the other VM tests, whose guests do not depend
# on it) in the foreground. A run then takes about as long as the longer of the
# two, not their sum. Both share the testbed build: the second to ask waits on its
# lock and reads the cache. The scenarios' output is printed when they end (and
# is in the log file named at the start meanwhile).
#
# Usage: scripts/test.sh PYTEST [PYTEST-ARGS...]
#   TEST_PARALLEL=0 runs one pytest over everything instead.
# Exit status: 0 if both passed, else the first non-zero status of the two.
set -u

pytest=$1
shift
scenarios=tests/testbed/test_scenarios.py

if [ "${TEST_PARALLEL:-1}" = 0 ]; then
	exec "$pytest" "$@"
fi

log=$(mktemp "${TMPDIR:-/tmp}/rampart-scenarios.XXXXXX.log") || exit 1
echo "testbed scenarios: in the background, output in $log"
"$pytest" -p no:cacheprovider "$@" "$scenarios" >"$log" 2>&1 &
background=$!
"$pytest" "$@" --ignore="$scenarios"
rest=$?
wait "$background"
scenario_status=$?
echo "--- testbed scenarios (exit status $scenario_status) ---"
cat "$log"
rm -f "$log"
if [ "$rest" -ne 0 ]; then
	exit "$rest"
fi
exit "$scenario_status"
