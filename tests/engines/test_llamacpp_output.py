"""What neuqi reads from llama-perplexity's printout (its KL-divergence mode)."""

from neuqi.engines.llamacpp import _parse_perplexity

# Printed by llama-perplexity (llama-cpp-python 0.3.36's tree) in --kl-divergence mode on
# SmolLM2-135M at Q4_0, 40 chunks of 512 tokens (2026-12-06); the percentile rows are cut.
KL_MODE = """\
kl_divergence: computing over 40 chunks, n_ctx=512, batch_size=2048, n_seq=4
====== Perplexity statistics ======
Mean PPL(Q)                   :  24.175483 ±   0.708161
Mean PPL(base)                :  21.653305 ±   0.629970
Cor(ln(PPL(Q)), ln(PPL(base))):  98.17%
Mean ln(PPL(Q)/PPL(base))     :   0.110181 ±   0.005589
Mean PPL(Q)/PPL(base)         :   1.116480 ±   0.006240
Mean PPL(Q)-PPL(base)         :   2.522178 ±   0.149823

====== KL divergence statistics ======
Mean    KLD:   0.126151 ±   0.002313
Maximum KLD:   6.303852
Median  KLD:   0.072027

====== Token probability statistics ======
Mean    Δp: -1.787 ± 0.081 %
Maximum Δp: 58.610%
Median  Δp: -0.091%
Minimum Δp: -90.664%
RMS Δp    :  8.356 ± 0.189 %
Same top p: 80.863 ± 0.390 %
"""


def test_kl_mode_fields_are_read():
    r = _parse_perplexity(KL_MODE, 512)
    assert (r.ppl, r.ppl_err) == (24.175483, 0.708161)
    assert (r.kl_mean, r.kl_err, r.same_top1) == (0.126151, 0.002313, 80.863)
    assert (r.ln_ppl_ratio, r.ln_ppl_ratio_err) == (0.110181, 0.005589)
    assert (r.mean_dp, r.mean_dp_err, r.rms_dp) == (-1.787, 0.081, 8.356)


def test_plain_mode_has_no_kl_fields():
    out = ("perplexity: calculating perplexity over 40 chunks, n_ctx=512\n"
           "Final estimate: PPL = 21.6533 +/- 0.62997\n")
    r = _parse_perplexity(out, 512)
    assert (r.ppl, r.ppl_err, r.chunks) == (21.6533, 0.62997, 40)
    assert r.kl_mean is None and r.ln_ppl_ratio is None and r.mean_dp is None
