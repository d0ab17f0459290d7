#!/bin/sh
# Installs pyfuse3 with Shoal's no-open patch (no-open.patch, see README.md here) into the Python given as $1,
# unless that exact build is there already. pyfuse3 has no wheels on PyPI, so pip builds it from the sdist anyway
# (gcc, Cython, libfuse3's headers); this builds the same sdist with the patch applied.
set -eu
python=$1
version=3.5.0
build=$version+shoal.noopen1
here=$(cd "$(dirname "$0")" && pwd)

installed=$("$python" -c 'import importlib.metadata as m; print(m.version("pyfuse3"))' 2>/dev/null || true)
if [ "$installed" = "$build" ]; then
	exit 0
fi
echo "Building pyfuse3 $build (pyfuse3 $version with deploy/pyfuse3/no-open.patch)"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$python" -m pip download --disable-pip-version-check -q --no-deps --no-binary :all: "pyfuse3==$version" -d "$work"
tar -xzf "$work/pyfuse3-$version.tar.gz" -C "$work"
source="$work/pyfuse3-$version"
# git apply works outside a repository, and git is there wherever this clone is; an image build has patch(1).
if command -v git >/dev/null 2>&1; then
	(cd "$source" && git apply -p1 "$here/no-open.patch")
else
	patch -d "$source" -p1 -s < "$here/no-open.patch"
fi
# The build's version says it is patched (the sdist's PKG-INFO is where its version comes from).
sed -i "s/^Version: $version\$/Version: $build/" "$source/PKG-INFO"
"$python" -m pip install --disable-pip-version-check -q --no-deps --force-reinstall "$source"
