#!/bin/sh
# One item of the compose demo; $1 is the payload (a number). It pretends
# to work for 0.1 to 2 s and misbehaves now and then, so that every panel
# of the dashboard has something to show.
set -eu

ms=$(shuf -i 100-2000 -n 1)
sleep "$((ms / 1000)).$(printf '%03d' $((ms % 1000)))"

roll=$(shuf -i 1-10000 -n 1)
if [ "$roll" -eq 1 ]; then
    # Kill the worker running this item (this script's parent): the
    # supervisor restarts it and requeues its leases at once.
    kill -KILL "$PPID"
fi
if [ $(($1 % 500)) -eq 0 ]; then
    echo "item $1: bad input" >&2
    exit 3 # listed with --permanent-exit: failed at once, no retry
fi
if [ "$roll" -le 500 ]; then
    echo "item $1: transient error" >&2
    exit 1 # retried with backoff, up to --max-attempts
fi
echo "item $1: ok"
