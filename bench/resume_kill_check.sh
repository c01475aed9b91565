#!/usr/bin/env bash
# A real run killed with SIGKILL, then resumed, must give the uninterrupted checkpoint.
#
#   bash bench/resume_kill_check.sh [MODEL] [SECONDS_BEFORE_KILL]
#
# Runs `neuqi quantize MODEL` once whole (into $OUT/a) and once killed after
# SECONDS_BEFORE_KILL (into $OUT/b), then `--resume`s the killed one and compares the
# two model.safetensors byte for byte. Run it alone on the machine.
set -euo pipefail
MODEL=${1:-.cache/neuqi/models/smollm2-135m}
WAIT=${2:-100}
OUT=${OUT:-/tmp/neuqi-resume-check}
NEUQI=${NEUQI:-.venv/bin/neuqi}
OPTS=(--bits 4 --group-size 128 --init neuqi --calib c4-sample --nsamples 16 --seqlen 512 --device cpu -q)
rm -rf "$OUT" && mkdir -p "$OUT"
/usr/bin/time -f "whole run: %e s" "$NEUQI" quantize "$MODEL" "${OPTS[@]}" --out-dir "$OUT/a"
"$NEUQI" quantize "$MODEL" "${OPTS[@]}" --out-dir "$OUT/b" > "$OUT/b.log" 2>&1 &
pid=$!
sleep "$WAIT"
kill -9 "$pid"
wait "$pid" || true
grep -h layers_done "$OUT"/b/.*.resume/state.json
/usr/bin/time -f "resumed run: %e s" "$NEUQI" quantize "$MODEL" "${OPTS[@]}" --out-dir "$OUT/b" --resume
cmp "$OUT"/a/*/model.safetensors "$OUT"/b/*/model.safetensors && echo "IDENTICAL checkpoints"
