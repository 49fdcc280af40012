#!/bin/bash
# Here (a machine with pip and the package index): the wheels the lent H200's image lacks, for Python 3.12,
# in groups that each fit one device call (64 MiB with the working tree). From the project root:
#   bash docs/gpu-wheels.sh          -> .car/whl (the engine: diffusers), .car/g1 .. .car/g3 (the live path)
# (.car/ is git-ignored.) The set is ../shared/notes/gpu-live-path.md's.
set -euo pipefail
P="--no-deps --only-binary=:all: --python-version 3.12 --implementation cp"
for n in 17 24 26 27 28 31 34 35; do P="$P --platform manylinux_2_${n}_x86_64"; done
P="$P --platform manylinux2014_x86_64 --platform manylinux1_x86_64"
get(){ d=$1; shift; mkdir -p .car/$d; python3 -m pip download -q $P -d .car/$d "$@"; }
get whl diffusers==0.42.1 importlib_metadata zipp
# So that the image's onnx, scipy and transformers import with numpy 1.26 and protobuf 4:
get g1 onnx==1.22.0 scipy==1.16.3 protobuf==4.25.8
get g2 mediapipe==0.10.21 numpy==1.26.4 aiortc==1.16.0
get g3 scikit-learn==1.7.2 aioice==0.13.0 av==18.1.0 pyee pylibsrtp google-crc32c cryptography pyopenssl cffi \
  pycparser dnspython ifaddr
du -sh .car/whl .car/g1 .car/g2 .car/g3
