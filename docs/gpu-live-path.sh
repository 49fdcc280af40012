#!/bin/bash
# The live path on the GPU (issues 17 item 4 and 19): plain serve, one Ray worker through the front, the governor.
# Run on the lent H200 as BENCHMARKS.md says (packages of ../shared/notes/gpu-live-path.md on PYTHONPATH).
# usage: gpu-live-path.sh RESULTS DURATION PHASES ENGINE_ARGS...   (from the project root; python = the one to use)
#   PHASES: a comma list of off, worker, gov (in that order of the list). Each phase starts its own server.
#   off and worker: animate at 25 fps (off2530: 25, then 30 fps, on one server). gov (--target-fps 30 --max-latency-ms 120): a 25 fps client at once, while
#   the other levels are being made; then, once they are (or after 900 s), 25 and 30 fps.
#   SERVE (environment): the command that serves, instead of `python -m streamer` (e.g. a wrapper that tunes the process)
R=$1; D=$2; PHASES=$3; shift 3; ENG="$*"
mkdir -p $R; X="python -m streamer"; SERVE=${SERVE:-$X}
log(){ echo "$(date -u +%T) $*" | tee -a $R/progress.txt; }
log "start: $ENG"
for rate in 25 30; do
  [ -f $R/clip$rate.mp4 ] || $X sample-clip $R/clip$rate.mp4 --fps $rate --seconds 10 >> $R/clips.txt 2>&1 \
    || log "sample-clip $rate failed"
done
up(){  # name port serve-flags...: start a server, wait until it serves
  name=$1; port=$2; shift 2
  log "$name: serve $ENG $*"
  t0=$(date +%s)
  $SERVE serve --port $port $ENG "$@" > $R/$name.serve.log 2>&1 &
  pid=$!
  until grep -q "http://" $R/$name.serve.log; do
    sleep 2; kill -0 $pid 2>/dev/null || { log "$name: server died"; tail -20 $R/$name.serve.log >> $R/progress.txt; return 1; }
    [ $(( $(date +%s) - t0 )) -gt 1500 ] && { log "$name: no start in 1500 s"; kill $pid; return 1; }
  done
  log "$name: up after $(( $(date +%s) - t0 )) s"
}
run(){  # label port rate mode
  $X client $R/clip$3.mp4 --server http://127.0.0.1:$2 --mode $4 --duration $D --loop \
      --report $R/$1.json > $R/$1.txt 2>&1 || log "$1: client failed"
  curl -s http://127.0.0.1:$2/stats > $R/$1.stats.json
  log "$1: $(tail -c 300 $R/$1.txt | tr '\n' ' ')"
}
down(){ kill $pid; wait $pid 2>/dev/null; }
for phase in ${PHASES//,/ }; do
  case $phase in
    off) up off 8790 && { run off-25-animate 8790 25 animate; down; } ;;
    off2530) up off 8790 && { run off-25-animate 8790 25 animate; run off-30-animate 8790 30 animate; down; } ;;
    worker) up worker 8792 --workers 1 && { run worker-25-animate 8792 25 animate; down; } ;;
    gov)
      up gov 8791 --target-fps 30 --max-latency-ms 120 || continue
      run gov-25-making 8791 25 animate  # while the other levels are made
      t0=$(date +%s)
      until [ $(grep -c "quality level .* \(ready\|could not\)" $R/gov.serve.log) -ge 3 ] \
            || [ $(( $(date +%s) - t0 )) -gt 900 ]; do sleep 5; done
      log "gov: levels: $(grep -o 'quality level .*' $R/gov.serve.log | tr '\n' ';')"
      run gov-25-animate 8791 25 animate
      run gov-30-animate 8791 30 animate
      down ;;
  esac
done
log "ALL DONE"
