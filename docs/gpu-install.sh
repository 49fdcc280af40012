#!/bin/bash
# On the device: install.sh DIR NAME puts DIR's wheels in /tmp/pk/NAME and touches /tmp/pk/NAME.ok.
# Each group's folder goes first on PYTHONPATH in the order g1:g2:g3:whl (run.sh does this).
mkdir -p /tmp/pk
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/pk/$2 $1/*.whl \
  && touch /tmp/pk/$2.ok && echo "installed $2: $(ls $1 | wc -l) wheels"
