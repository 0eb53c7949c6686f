#!/bin/bash
# The Python packages imnet needs that the GPU machine's image lacks (pydantic and its own needs), as
# wheels for its Python 3.12 in .whl/ (ignored by git), at the versions installed here:
#
#   bash bench/gpu_wheels.sh      # then carry .whl with the call; gpu_session.sh installs them
set -eu
cd "$(dirname "$0")/.."
grep -qx "/.whl/" .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo "/.whl/" >> .git/info/exclude; }
pins=$(python3 -m pip list --format=freeze 2>/dev/null | grep -iE '^(pydantic|pydantic_core|pydantic-core|annotated-types|annotated_types|typing-inspection|typing_inspection)==')
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl $pins
ls .whl
