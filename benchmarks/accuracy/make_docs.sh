#!/usr/bin/env bash
# Regenerate every accuracy table under docs/accuracy/ from the committed run folders.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
R=benchmarks/results
T=benchmarks/accuracy/make_table.py
has_runs() { compgen -G "$1/*/result.json" > /dev/null; }
python3 $T $R/resnet20_table --out docs/accuracy/resnet20.md \
    --title "ResNet-20 / CIFAR-10: all methods, W4A4, W2A4, W2A2" > /dev/null
if has_runs $R/resnet20_ablations; then
    python3 $T $R/resnet20_table $R/resnet20_ablations --out docs/accuracy/resnet20_ablations.md \
        --title "ResNet-20 / CIFAR-10 W2A4: PD-Quant ablations" --only-bits 2/4 \
        --only-seeds 1005 --cmp-method pdquant pdquant-lambr1 pdquant-dc_only > /dev/null
fi
if has_runs $R/resnet20_long; then
    python3 $T $R/resnet20_long --out docs/accuracy/resnet20_long.md \
        --title "ResNet-20 / CIFAR-10 W2A4: QDrop vs PD-Quant with more iterations" \
        --cmp-method pdquant pdquant-lambr1 > /dev/null
fi
if has_runs $R/resnet20_bf16_tail; then
    python3 $T $R/resnet20_bf16_tail --out docs/accuracy/resnet20_bf16_tail.md \
        --title "ResNet-20 / CIFAR-10: PD-Quant with the PD tail in bfloat16" \
        --ref-method pdquant --cmp-method pdquant-bf16 > /dev/null
fi
if has_runs $R/efficientnet; then
    python3 $T $R/efficientnet --out docs/accuracy/efficientnet_lite0.md \
        --title "EfficientNet-Lite0 / ImageNet subsets: QDrop vs PD-Quant" > /dev/null
fi
echo "wrote docs/accuracy/*.md"
