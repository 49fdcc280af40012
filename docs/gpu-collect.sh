#!/bin/bash
# On the device: collect.sh [stop] copies what the queue has written so far to $OUT/all.tgz (the device time
# may end before "QUEUE DONE"); with "stop", the queue and its running line are stopped first.
if [ "$1" = stop ]; then
  pkill -f "[g]pu-run.sh"; pkill -f "[s]treamer bench"; pkill -f "[g]pu-live-path.sh"; pkill -f "[s]treamer serve"
fi
find /tmp/res -name tick-trace.json -delete 2>/dev/null
(cd /tmp && tar czf "$OUT/all.tgz" --exclude='*.mp4' res $(ls -d /tmp/resLP* 2>/dev/null | sed 's|/tmp/||'))
tail -n 5 /tmp/res/progress.txt
