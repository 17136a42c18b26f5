#!/bin/sh
# Selects the torch build in a copy of constraints.txt for the platform image, and changes
# nothing else in it: the image installs exactly what `make setup` installs.
#   torch-variant.sh cpu  CONSTRAINTS   keep torch==X+cpu (the PyTorch CPU index, see Dockerfile)
#   torch-variant.sh cuda CONSTRAINTS   torch==X, PyPI's Linux build of the same version (CUDA
#                                       wheels; the host needs a matching NVIDIA driver)
set -eu
variant="${1:?usage: torch-variant.sh cpu|cuda CONSTRAINTS}"
file="${2:?usage: torch-variant.sh cpu|cuda CONSTRAINTS}"
grep -Eq '^torch==[^+[:space:]]+\+cpu$' "$file" || {
    echo "torch-variant.sh: no 'torch==VERSION+cpu' pin in $file" >&2
    exit 2
}
case "$variant" in
    cpu) ;;
    cuda) sed -i -E 's/^(torch==[^+[:space:]]+)\+cpu$/\1/' "$file" ;;
    *)
        echo "torch-variant.sh: variant must be cpu or cuda, not '$variant'" >&2
        exit 2
        ;;
esac
