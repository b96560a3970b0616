#!/bin/sh
# The pytest part of `make test`, in two processes side by side: the testbed
# scenarios (tests/testbed/test_scenarios.py: one guest through scenarios 1 to 12,
# another for 11 and 15, and the update server on its fixed port), then the IPsec
# gateway's guest (test_gateway.py), in the background, every other test (host tests
# and the other VM tests, whose guests do not depend on them) in the foreground. A
# run then takes about as long as the longer of the two, not their sum; the VM
# modules are dealt so that the two take about as long. Both share the
# testbed build: the second to ask waits on its lock and reads the cache. The
# background's output is printed when it ends (and is in the log file named at the
# start meanwhile).
#
# Usage: scripts/test.sh PYTEST [PYTEST-ARGS...]
#   TEST_PARALLEL=0 runs one pytest over everything instead.
# Exit status: 0 if both passed, else the first non-zero status of the two.
set -u

pytest=$1
shift
background="tests/testbed/test_scenarios.py tests/testbed/test_gateway.py"

if [ "${TEST_PARALLEL:-1}" = 0 ]; then
	exec "$pytest" "$@"
fi

log=$(mktemp "${TMPDIR:-/tmp}/rampart-scenarios.XXXXXX.log") || exit 1
echo "testbed scenarios and machines: in the background, output in $log"
ignored=""
for module in $background; do
	ignored="$ignored --ignore=$module"
done
# shellcheck disable=SC2086 # the module lists are split on purpose
"$pytest" -p no:cacheprovider "$@" $background >"$log" 2>&1 &
pid=$!
# shellcheck disable=SC2086
"$pytest" "$@" $ignored
rest=$?
wait "$pid"
scenario_status=$?
echo "--- testbed scenarios and machines (exit status $scenario_status) ---"
cat "$log"
rm -f "$log"
if [ "$rest" -ne 0 ]; then
	exit "$rest"
fi
exit "$scenario_status"
