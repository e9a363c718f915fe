#!/bin/sh
# cutout-models' command: copy /models/*.onnx into TARGET (default /target), then
# verify every copy against the checksums taken when the image was built.
# Run it as an init container with TARGET on a volume the inference node mounts
# read-only as its CUTOUT_MODEL_DIR. A file already there with the same bytes is
# left alone; others are written under a temporary name and renamed, so a node
# never sees half a model.
set -eu
target=${1:-/target}
[ -d "$target" ] || { echo "copy-models: $target is not a directory" >&2; exit 1; }
cd /models
for model in *.onnx; do
    if [ -f "$target/$model" ] && cmp -s "$model" "$target/$model"; then
        echo "copy-models: $model already in $target"
        continue
    fi
    cp "$model" "$target/.$model.part"
    mv "$target/.$model.part" "$target/$model"
    echo "copy-models: $model -> $target"
done
cd "$target"
sha256sum -c /models/SHA256SUMS
