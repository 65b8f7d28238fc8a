#!/usr/bin/env bash
# A screenshot of `cjepa report --html` for a person to look at: runs a tiny pipeline (a short
# C-JEPA pretraining on synthetic images, plus, in a build with test stages, one stage that fails
# and one behind it), renders the page and photographs it with headless Chromium.
#
#   scripts/report-screenshot.sh [OUT_DIR]      (default: target/report-screenshot)
#
# Installs Debian's `chromium` package when it is missing (needs root and apt). Writes
# OUT_DIR/report.html and OUT_DIR/report.png (the whole page, 1280 px wide).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-target/report-screenshot}
mkdir -p "$out"
out=$(cd "$out" && pwd)

browser=$(command -v chromium || command -v chromium-browser || true)
if [ -z "$browser" ]; then
    echo "installing chromium (Debian package)" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
    browser=$(command -v chromium)
fi

cargo build --features test-stages --bin cjepa
cjepa=$PWD/target/debug/cjepa
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cat >"$work/p.yaml" <<'EOF'
name: report_screenshot
defaults: { seed: 0, device: cpu }
stages:
  data:
    kind: dataset
    source: synth
    format: imagefolder
    params: { classes: 4, train_per_class: 16, val_per_class: 4, size: 32 }
  pretrain:
    kind: pretrain
    needs: [data]
    model: { preset: vit_tiny, embed_dim: 48, depth: 2, pred_embed_dim: 48, pred_depth: 1, img_size: 32, patch_size: 8 }
    matrix: { method: [ijepa, cjepa] }
    params: { epochs: 4, batch: 8, warmup_epochs: 1, log_every: 2 }
  boom:
    kind: counter
    params: { steps: 5, fail_at: 2 }
  after:
    kind: counter
    needs: [boom]
    params: { steps: 2 }
EOF
# the failing stage makes the run exit non-zero: that is the point
"$cjepa" run "$work/p.yaml" --keep-going || true
"$cjepa" report "$work/p.yaml" --html "$out/report.html"

# a tall window: the screenshot holds the whole page
"$browser" --headless --no-sandbox --disable-gpu --hide-scrollbars \
    --window-size=1280,5200 --screenshot="$out/report.png" "file://$out/report.html" \
    >/dev/null 2>&1
echo "wrote $out/report.html and $out/report.png"
