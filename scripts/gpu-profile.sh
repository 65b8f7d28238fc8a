#!/usr/bin/env bash
# Where the GPU time of one training step goes: runs `cjepa bench train-step` (ViT-B/16, 224 px,
# batch 64; one warm-up and one timed step) under Nsight Compute with only the kernel-duration
# metric, then sums the durations per kernel name. Prints, per precision, the kernels by total
# time (count, total ms, mean us) and the sum of all kernel time against the step's wall time
# (what is left is host-side work and launch gaps). RUN IT ON A GPU MACHINE with `ncu` on PATH
# (or under /opt/nvidia/nsight-compute/*/), with binaries as for scripts/gpu-check.sh.
#
# Usage: scripts/gpu-profile.sh [f32|bf16 ...]   (default: f32 bf16)
# Environment: CJEPA_CUDA_TARGET, GPU (default cuda:0), PROFILE_ARGS (extra bench args),
#              PROFILE_TIMEOUT (seconds per ncu run, default 150),
#              CJEPA_CHECK_LOGS=DIR (the raw CSVs are copied there).
set -uo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
target="${CJEPA_CUDA_TARGET:-$repo/target/cuda}"
gpu="${GPU:-cuda:0}"
precisions=("$@")
[[ ${#precisions[@]} -gt 0 ]] || precisions=(f32 bf16)
work="${TMPDIR:-/tmp}/cjepa-gpu-profile"
rm -rf "$work" && mkdir -p "$work"
ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | tail -n1)
[[ -x "$ncu" ]] || { echo "no ncu found" >&2; exit 2; }
if py=$(command -v python3); then
  site=$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' 2>/dev/null || true)
  for d in "$site/nvidia/cu13/lib" "$site/nvidia/nccl/lib"; do
    [[ -d "$d" ]] && export LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  done
fi
if compgen -G "$repo/.gpu/*.gz" >/dev/null; then
  gzip -dc "$repo/.gpu/cjepa.gz" >"$work/cjepa" && chmod +x "$work/cjepa"
  cjepa="$work/cjepa"
else
  cjepa="$target/release/cjepa"
fi
for prec in "${precisions[@]}"; do
  echo "== $prec: bench train-step vit_base 224 px batch 64 (1 warm-up + 1 timed step), no profiler"
  # shellcheck disable=SC2086
  "$cjepa" bench train-step --model vit_base --img 224 --batch 64 --device "$gpu" --steps 3 \
    --warmup 1 --precision "$prec" ${PROFILE_ARGS:-} 2>&1 | grep -E 'RESULT|phases|s/step'
  echo "== $prec: the same two steps under ncu (kernel durations)"
  # shellcheck disable=SC2086
  timeout "${PROFILE_TIMEOUT:-150}" "$ncu" --metrics gpu__time_duration.sum --csv --print-units base \
    --cache-control none --clock-control none --target-processes all \
    "$cjepa" bench train-step --model vit_base --img 224 --batch 64 --device "$gpu" --steps 1 --fused on \
    --warmup 1 --precision "$prec" ${PROFILE_ARGS:-} >"$work/$prec.csv" 2>"$work/$prec.err"
  echo "ncu exit $?; $(grep -c gpu__time_duration "$work/$prec.csv") kernel launches"
  python3 - "$work/$prec.csv" <<'PY'
import csv, sys, collections
rows = [r for r in csv.reader(open(sys.argv[1], errors="replace")) if len(r) > 5]
start = next((i for i, r in enumerate(rows) if "Kernel Name" in r), None)
if start is None:
    print("no ncu table in the output"); sys.exit(0)
head = rows[start]
ki, vi, mi = head.index("Kernel Name"), head.index("Metric Value"), head.index("Metric Name")
tot, cnt = collections.Counter(), collections.Counter()
for r in rows[start + 1:]:
    if len(r) != len(head) or not r[mi].startswith("gpu__time_duration"):
        continue
    name = r[ki].split("(")[0][:70]
    tot[name] += float(r[vi].replace(",", "")) / 1e6
    cnt[name] += 1
all_ms = sum(tot.values())
print(f"kernel time, 2 steps: {all_ms:.1f} ms over {sum(cnt.values())} launches")
print(f"{'kernel':72s} {'count':>6s} {'total ms':>9s} {'mean us':>8s}")
for name, ms in tot.most_common(25):
    print(f"{name:72s} {cnt[name]:6d} {ms:9.2f} {1e3 * ms / cnt[name]:8.1f}")
PY
done
if [[ -n "${CJEPA_CHECK_LOGS:-}" ]]; then tar czf "$CJEPA_CHECK_LOGS/gpu-profile.tgz" -C "$work" $(cd "$work" && ls *.csv *.err 2>/dev/null); fi
