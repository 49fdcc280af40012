#!/bin/bash
# On the device: install.sh DIR NAME puts DIR's wheels in /tmp/pk/NAME and touches /tmp/pk/NAME.ok.
# Each group's folder goes first on PYTHONPATH in the order g1:g2:g3:whl (run.sh does this).
# One wheel per project and version (pip refuses two platform builds of one release side by side).
mkdir -p /tmp/pk
wheels=$(ls "$1"/*.whl | awk -F/ '{split($NF, p, "-"); k = p[1] "-" p[2]; if (!(k in seen)) { seen[k]; print } }')
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/pk/$2 $wheels \
  && touch /tmp/pk/$2.ok && echo "installed $2: $(echo "$wheels" | wc -l) wheels"
