#!/usr/bin/env bash
# Benchmark: CPU per Append of each thread of the engine process behind `coexit serve --frontends 1`, under
# bench/cloud_load.py's load: the engine thread (model compute and host work) and the event-loop thread (receiving
# Appends, queueing them, sending the packed replies), which competes with the engine thread for the GIL.
#
# It starts bench/cloud_load.py in the background, waits WAIT seconds into its decode phase, then reads every engine
# thread's CPU time (/proc/PID/task/TID/stat) and the tokens served (coexit_tick_sessions_sum) over a 10 s window.
# The engine process is the server's child with the largest resident memory (it holds the model and the KV pool).
#
#   bash bench/engine_thread_cpu.sh [older checkout, passed as --server-root]   # env: SESSIONS=64 WAIT=40
set -euo pipefail
cd "$(dirname "$0")/.."
root=()
[ -n "${1:-}" ] && root=(--server-root "$1")
log=$(mktemp)
.venv/bin/python bench/cloud_load.py --sessions "${SESSIONS:-64}" --steps 850 --frontends 1 "${root[@]}" >"$log" 2>&1 &
bench=$!
sleep "${WAIT:-40}"
server=$(pgrep -f "coexit.cli serve" | head -1)
metrics=$(tr '\0' ' ' </proc/"$server"/cmdline | sed 's/.*--metrics-port \([0-9]*\).*/\1/')
engine=$(for p in $(pgrep -P "$server"); do echo "$(awk '/VmRSS/ {print $2}' /proc/"$p"/status) $p"; done |
         sort -n | tail -1 | cut -d' ' -f2)
tokens() { .venv/bin/python -c "import urllib.request, re; t = urllib.request.urlopen('http://127.0.0.1:$metrics/metrics').read().decode(); print(re.search(r'^coexit_tick_sessions_sum (\S+)', t, re.M).group(1))"; }
snap() { for t in /proc/"$engine"/task/*; do echo "$(basename "$t") $(awk '{print $14 + $15}' "$t"/stat)"; done | sort; }
t0=$(tokens); a=$(snap); sleep 10; b=$(snap); t1=$(tokens)
n=$(.venv/bin/python -c "print(int($t1 - $t0))")
hz=$(getconf CLK_TCK)
echo "engine process $engine: $n tokens in 10 s; CPU per token of each thread that ran:"
join <(echo "$a") <(echo "$b") | awk -v n="$n" -v hz="$hz" -v main="$engine" '{d = ($3 - $2) * 1e6 / hz
  if (d > 0) printf "  %s %-12s %8.0f ms  %7.1f us/token\n", $1, ($1 == main ? "(event loop)" : ""), d / 1e3, d / n}'
wait "$bench"
tail -1 "$log"
rm -f "$log"
