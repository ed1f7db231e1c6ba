#!/bin/sh
# Remove what a serving venv never uses (about 190 MB of the CPU image): torch's C++ unit-test binaries, its C/C++
# headers (only for compiling extensions, and final images have no compiler) and protoc. Python packages, shared
# libraries and torch_shm_manager stay. Runs in a build stage, so the savings reach the final stage's COPY.
set -eu
torch_dir=$(/opt/venv/bin/python -c 'import os, torch; print(os.path.dirname(torch.__file__))')
rm -rf "$torch_dir/test" "$torch_dir/include"
find "$torch_dir/bin" -maxdepth 1 -type f \( -name '*Test' -o -name 'test_*' -o -name 'protoc*' \) -delete
