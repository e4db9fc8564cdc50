#!/usr/bin/env bash
# Build Pyfhel 3.5.0 from the registry's sdist once, and cache the wheel.
#
# Pyfhel ships only an sdist, and its build fetches Microsoft GSL, zlib and zstd from
# the internet unless SEAL_USE_MSGSL, SEAL_USE_ZLIB and SEAL_USE_ZSTD are OFF in the
# cmake options of its pyproject.toml. This script turns them off, builds the wheel
# (about 5 minutes on 2 cores) and leaves it in the wheelhouse, where `pip install
# --find-links "$WHEELHOUSE"` (install.sh, .ci/run, tox) picks it up.
#
# Usage: scripts/build_pyfhel_wheel.sh [WHEELHOUSE]
#        WHEELHOUSE defaults to $SECUREINFER_WHEELHOUSE or ~/.cache/secureinfer/wheels.
set -euo pipefail

VERSION=3.5.0
PYTHON=${PYTHON:-python3}
WHEELHOUSE=${1:-${SECUREINFER_WHEELHOUSE:-$HOME/.cache/secureinfer/wheels}}
mkdir -p "$WHEELHOUSE"

tag=$("$PYTHON" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
if ls "$WHEELHOUSE"/pyfhel-$VERSION-$tag-*.whl >/dev/null 2>&1; then
  echo "Pyfhel $VERSION wheel for $tag already cached in $WHEELHOUSE"
  exit 0
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "Fetching the Pyfhel $VERSION sdist ..."
"$PYTHON" -m pip download --quiet --no-deps --no-binary Pyfhel "Pyfhel==$VERSION" -d "$work"
tar -xzf "$work"/pyfhel-$VERSION.tar.gz -C "$work"
src="$work/pyfhel-$VERSION"

# Turn off the three SEAL options whose cmake step downloads sources.
for opt in SEAL_USE_MSGSL SEAL_USE_ZLIB SEAL_USE_ZSTD; do
  sed -i -E "s/^(\s*$opt\s*=\s*)'ON'/\1'OFF'/" "$src/pyproject.toml"
  grep -Eq "^\s*$opt\s*=\s*'OFF'" "$src/pyproject.toml" || {
    echo "could not set $opt=OFF in Pyfhel's pyproject.toml" >&2; exit 1; }
done

echo "Building the Pyfhel $VERSION wheel (about 5 minutes on 2 cores) ..."
start=$(date +%s)
"$PYTHON" -m pip wheel --quiet --no-deps -w "$WHEELHOUSE" "$src"
echo "Built $(ls "$WHEELHOUSE"/pyfhel-$VERSION-$tag-*.whl) in $(( $(date +%s) - start )) s"
