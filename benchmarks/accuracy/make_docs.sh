#!/usr/bin/env bash
# Regenerate every accuracy table under docs/accuracy/ from the committed run folders.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
R=benchmarks/results
T=benchmarks/accuracy/make_table.py
python3 $T $R/resnet20_table --out docs/accuracy/resnet20.md \
    --title "ResNet-20 / CIFAR-10: all methods, W4A4, W2A4, W2A2" > /dev/null
if [ -d $R/resnet20_ablations ]; then
    python3 $T $R/resnet20_table $R/resnet20_ablations --out docs/accuracy/resnet20_ablations.md \
        --title "ResNet-20 / CIFAR-10 W2A4: PD-Quant ablations" --only-bits 2/4 \
        --only-seeds 1005 > /dev/null
fi
if [ -d $R/efficientnet ]; then
    python3 $T $R/efficientnet --out docs/accuracy/efficientnet_lite0.md \
        --title "EfficientNet-Lite0 / ImageNet subsets: QDrop vs PD-Quant" > /dev/null
fi
echo "wrote docs/accuracy/*.md"
