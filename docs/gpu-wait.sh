#!/bin/bash
# On the device: wait.sh SECONDS prints the progress lines not printed yet, until SECONDS pass or the queue is done;
# once done it copies /tmp/all.tgz to $OUT.
f=/tmp/res/progress.txt; seen=/tmp/res/.printed; t0=$(date +%s)
while true; do
  n=$(cat $seen 2>/dev/null || echo 0)
  [ -f $f ] && { tail -n +$((n + 1)) $f; wc -l < $f > $seen; }
  grep -q "QUEUE DONE" $f 2>/dev/null && { cp /tmp/all.tgz "$OUT/"; break; }
  [ $(( $(date +%s) - t0 )) -ge $1 ] && break
  sleep 3
done
nvidia-smi --query-gpu=utilization.gpu,memory.used,clocks.sm --format=csv,noheader
