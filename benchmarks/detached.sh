#!/usr/bin/env bash
# Work longer than one call of a lent GPU machine (10 minutes): start it detached from the call's process group, then
# wait for it from the next calls while the machine is still warm (its files, and the detached process, stay there).
#
#   benchmarks/detached.sh start NAME CMD...   # runs CMD in its own session; its output in runs/detached/NAME.log
#   benchmarks/detached.sh wait NAME [SECONDS] # up to SECONDS (default 540): exit 0 once it ended (its status in
#                                              # NAME.rc), 3 if it still runs; prints the log's tail either way
#   benchmarks/detached.sh status NAME
#
# A machine given back (idle too long between calls) ends the work; training runs resume from their checkpoints
# only on the machine that wrote them, so chain the calls.
# Each call copies the working tree again: what CMD writes must go under an ignored folder (runs/, data/, .cache/),
# since a tracked file is put back and an untracked one removed. Output through a pipe into the log: `grep
# --line-buffered` (or python -u), or the log shows nothing until the command ends. Stop it with `kill -- -PID`
# (PID from runs/detached/NAME.pid: its own process group); never `pkill -f` a pattern, which matches the calling
# command's own shell too.
set -u
dir=runs/detached
mkdir -p "$dir"
what=${1:-}; name=${2:-}
if [ -z "$what" ] || [ -z "$name" ]; then
  echo "usage: $0 start NAME CMD... | wait NAME [SECONDS] | status NAME" >&2; exit 2
fi
case $name in *[!A-Za-z0-9._-]*) echo "invalid NAME '$name': letters, digits, '.', '_' and '-' only" >&2; exit 2 ;; esac
log=$dir/$name.log; rc=$dir/$name.rc
case $what in
  start)
    shift 2
    [ $# -gt 0 ] || { echo "start $name: no command given" >&2; exit 2; }
    if [ -f "$dir/$name.pid" ] && kill -0 "$(cat "$dir/$name.pid")" 2>/dev/null; then
      echo "$name is already running (pid $(cat "$dir/$name.pid"))" >&2; exit 2
    fi
    rm -f "$rc"
    # setsid: a process of its own session outlives the call that started it
    setsid bash -c '"$@" > "'"$log"'" 2>&1; echo $? > "'"$rc"'"' _ "$@" < /dev/null > /dev/null 2>&1 &
    echo $! > "$dir/$name.pid"
    echo "started $name (pid $!), log $log" ;;
  wait|status)
    limit=${3:-540}; [ "$what" = status ] && limit=0
    start=$SECONDS
    while [ ! -f "$rc" ] && [ $((SECONDS - start)) -lt "$limit" ]; do sleep 5; done
    tail -n 20 "$log" 2>/dev/null
    if [ -f "$rc" ]; then echo "$name ended with status $(cat "$rc")"; exit 0; fi
    if [ -f "$dir/$name.pid" ] && kill -0 "$(cat "$dir/$name.pid")" 2>/dev/null; then
      echo "$name still running after $((SECONDS - start)) s"; exit 3
    fi
    echo "$name is not running and left no status (never started here, or its machine was replaced)"; exit 4 ;;
  *) echo "unknown action '$what': expected start, wait or status" >&2; exit 2 ;;
esac
