#!/bin/bash
# On the device, the first call: the working tree to /tmp/tA, the engine's wheels installed, QUEUE started
# in a process session of its own (it outlives the call). usage: bash docs/gpu-start.sh QUEUE
mkdir -p /tmp/tA && tar --exclude=./.car --exclude=./.whl --exclude=./.git -cf - . | (cd /tmp/tA && tar xf -)
bash docs/gpu-install.sh .car/whl whl
cp "$1" /tmp/queue.txt
(setsid nohup bash /tmp/tA/docs/gpu-run.sh /tmp/queue.txt > /tmp/run.log 2>&1 &)
sleep 5; cat /tmp/res/progress.txt
