#!/bin/sh
# Issue 18's measurements on SmolLM2-135M, one process at a time, resumable (runs that
# exist are re-used), each variant next to the paper's run of the same config.
set -e
P="python bench/peers.py --tools= --tasks austen_lambada --zeroshot-limit 200"
$P --configs 2:64 --ours "NeUQI_int+LDLQ,MSE+LDLQ,NeUQI_int+LDLQ hpow0,MSE+LDLQ hpow0,NeUQI_int+LDLQ hpow0.5"
$P --configs 3:64 --ours "NeUQI_int+LDLQ,NeUQI_int+LDLQ hpow0.5,NeUQI_int+LDLQ hpow0"
$P --configs 2:64,3:64 --reuse-only --ours "NeUQI_int+LDLQ,NeUQI_int+LDLQ select+refit,MSE+LDLQ,MSE+LDLQ hpow0,NeUQI_int+LDLQ hpow0,NeUQI_int+LDLQ hpow0.5"
