#!/bin/sh
# Install aetherd into its own virtualenv. Used by the Dockerfile, and by the test suite
# (tests/test_packaging.py) so that the image's install steps are exercised here.
#
#   sh packaging/install.sh [PREFIX] [SOURCE]     # defaults: /opt/aetherd, this checkout
set -eu
PREFIX=${1:-/opt/aetherd}
SOURCE=${2:-$(CDPATH= cd -- "$(dirname -- "$0")/.." && pwd)}
PYTHON=${PYTHON:-python3}

"$PYTHON" -m venv "$PREFIX"
"$PREFIX/bin/python" -m pip install --quiet --no-cache-dir --upgrade pip
"$PREFIX/bin/python" -m pip install --quiet --no-cache-dir "$SOURCE"
mkdir -p "$PREFIX/share/doc/aetherd" "$PREFIX/lib/systemd/system"
cp "$SOURCE/README.md" "$PREFIX/share/doc/aetherd/"
cp "$SOURCE/systemd/aetherd.service" "$SOURCE/systemd/aetherd.socket" "$PREFIX/lib/systemd/system/"
"$PREFIX/bin/aetherd" --version
