#!/bin/bash
# On the device: run QUEUE's lines one after another in the background, logging to /tmp/res/progress.txt.
# Wheels first, here: bash docs/gpu-wheels.sh. First call (carry .car/whl and the queue, e.g. docs/gpu-queue-18.txt):
#   bash docs/gpu-start.sh docs/gpu-queue-18.txt
# Then one call per wheel group (carry .car/gN): bash docs/gpu-install.sh .car/gN gN; bash docs/gpu-wait.sh 300
# and calls of wait.sh until "QUEUE DONE"; each call within 30 s of the last (the machine idles out). When the
# device time runs short first: bash docs/gpu-collect.sh stop (what is done so far, to $OUT/all.tgz).
# A queue line runs in /tmp/tA (the working tree of the first call) with the engine's wheels on PYTHONPATH;
# a line starting with "live:" waits for the three live-path groups and runs with them too.
# $B in a line: the live engine's bench at the issue 18 configuration.
Q=$1; cd /tmp/tA; mkdir -p /tmp/res
log(){ echo "$(date -u +%T) $*" >> /tmp/res/progress.txt; }
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/pk/whl:/tmp/tA
export B="python3 -m streamer bench --engine xportrait --stream --compile --tiny-decoder random --random-weights --size 512 --source astronaut --fast-only --baseline-frames 0 --warmup 8"
command -v python >/dev/null || ln -s "$(command -v python3)" /usr/local/bin/python
log "start: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader), torch $(python3 -c 'import torch; print(torch.__version__)')"
n=0
while IFS= read -r line; do
  [ -z "$line" ] || [ "${line#\#}" != "$line" ] && continue
  n=$((n + 1))
  if [ "${line#live:}" != "$line" ]; then
    line=${line#live:}
    until [ -f /tmp/pk/g1.ok ] && [ -f /tmp/pk/g2.ok ] && [ -f /tmp/pk/g3.ok ]; do sleep 2; done
    export PYTHONPATH=/tmp/pk/g1:/tmp/pk/g2:/tmp/pk/g3:/tmp/pk/whl:/tmp/tA
  fi
  log "[$n] $line"
  bash -c "$line" > /tmp/res/$n.out 2> /tmp/res/$n.err
  rc=$?
  log "[$n] rc $rc: $(grep '^{' /tmp/res/$n.err | python3 /tmp/tA/docs/gpu-summary.py)"
  [ $rc = 0 ] || tail -3 /tmp/res/$n.err >> /tmp/res/progress.txt
done < "$Q"
log "inductor's cache: $(du -sh /tmp/torchinductor_* 2>/dev/null | tr '\n' ' ')(a later machine compiles it all again)"
find /tmp/res -name tick-trace.json -delete
(cd /tmp && tar czf /tmp/all.tgz --exclude='*.mp4' res $(ls -d /tmp/resLP* 2>/dev/null | sed 's|/tmp/||'))
log "QUEUE DONE"
