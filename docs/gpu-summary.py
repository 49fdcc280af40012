"""The bench's per-run JSON lines (stderr) on stdin -> one line: fps, step, in->out per run."""
import json
import sys

for line in sys.stdin:
    r = json.loads(line)
    print(f"[{r['engine'][-24:]}, {r.get('level_groups', 1)} pass(es): {r['fps']:.1f} fps, step {r['step_ms']['p50']:.2f}"
          f"/{r['step_ms']['p95']:.2f}, in->out {r['latency_ms']['p50']:.1f}/{r['latency_ms']['p95']:.1f} ms, "
          f"up {r['startup_s']:.0f} s]", end=" ")
print()
