#!/bin/sh
# Install torch into /opt/venv from the source named by the TORCH_SOURCE build arg.
#
#   https://...  a PyTorch wheel index (default: the CPU index, so the CPU image does not pull a multi-GB CUDA build)
#   wheels       a torch wheel placed in the build context's deploy/wheels/ (offline or mirrored builds; its
#                dependencies still come from the package index)
#   pypi         PyPI's default build (a CUDA build on Linux x86_64)
set -eu

source_="$1"
version="$2"
pip=/tmp/build/pip.sh

case "$source_" in
    http://* | https://*)
        "$pip" install --index-url "$source_" "torch==$version"
        ;;
    wheels)
        # Exactly one matching wheel, or the build stops here with the reason.
        set -- /tmp/build/wheels/torch-"$version"*.whl
        if [ ! -f "$1" ]; then
            echo "TORCH_SOURCE=wheels but no torch-$version*.whl in deploy/wheels/ of the build context" >&2
            exit 1
        fi
        if [ "$#" -ne 1 ]; then
            echo "TORCH_SOURCE=wheels: several torch-$version wheels in deploy/wheels/: $*" >&2
            exit 1
        fi
        "$pip" install "$1"
        ;;
    pypi)
        "$pip" install "torch==$version"
        ;;
    *)
        echo "TORCH_SOURCE must be an index URL, 'wheels' or 'pypi', got '$source_'" >&2
        exit 1
        ;;
esac
