#!/bin/bash
# The live path on the GPU (issues 17 item 4 and 19): off, governor on, one Ray worker through the front.
# Run on the lent H200 as BENCHMARKS.md says (packages of ../shared/notes/gpu-live-path.md on PYTHONPATH).
# usage: live7.sh RESULTS DURATION ENGINE_ARGS...   (run from the project root; python = the one to use)
R=$1; D=$2; shift 2; ENG="$*"
mkdir -p $R; X="python -m streamer"
log(){ echo "$(date -u +%T) $*" | tee -a $R/progress.txt; }
log "start: $ENG"
$X sample-clip $R/clip25.mp4 --fps 25 --seconds 10 > $R/clips.txt 2>&1 || log "sample-clip 25 failed"
$X sample-clip $R/clip30.mp4 --fps 30 --seconds 10 >> $R/clips.txt 2>&1 || log "sample-clip 30 failed"
phase(){  # name port modes serve-flags...
  name=$1; port=$2; modes=$3; shift 3
  log "$name: serve $ENG $*"
  t0=$(date +%s)
  $X serve --port $port $ENG "$@" > $R/$name.serve.log 2>&1 &
  pid=$!
  until grep -q "http://" $R/$name.serve.log; do
    sleep 2; kill -0 $pid 2>/dev/null || { log "$name: server died"; tail -20 $R/$name.serve.log >> $R/progress.txt; return; }
    [ $(( $(date +%s) - t0 )) -gt 1500 ] && { log "$name: no start in 1500 s"; kill $pid; return; }
  done
  log "$name: up after $(( $(date +%s) - t0 )) s"
  for rate in 25 30; do
    for mode in $modes; do
      $X client $R/clip$rate.mp4 --server http://127.0.0.1:$port --mode $mode --duration $D --loop \
          --report $R/$name-$rate-$mode.json > $R/$name-$rate-$mode.txt 2>&1 || log "$name $rate $mode: client failed"
      curl -s http://127.0.0.1:$port/stats > $R/$name-$rate-$mode.stats.json
      log "$name $rate $mode: $(tail -c 300 $R/$name-$rate-$mode.txt | tr '\n' ' ')"
    done
  done
  kill $pid; wait $pid 2>/dev/null
}
phase off 8790 "echo animate"
phase gov 8791 animate --target-fps 30 --max-latency-ms 120
if [ -n "$RAYWAIT" ]; then
  log "waiting for ray"; until [ -f $RAYWAIT ]; do sleep 2; done
fi
phase worker 8792 animate --workers 1
log "ALL DONE"
