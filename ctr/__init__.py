"""ctr: the helper package of the "Catch, Tag, Release" book.

definitions  the paper's equations (alpha, sinks, tags, z_tag, variance_explained, mass-mean probe)
models, arch load a causal LM with eager attention; per-architecture module paths
extract      stream A, V, head outputs and the residual stream out of one nnsight trace
analysis     per-head sinks and VE, vectorised over heads
showcase, variance, probes, taxonomy, qknorm, toy, toy_multihead   one module per chapter
data         prompt sets generated offline from packaged data
results, scorecard, book, htmlcheck, bench   results files, verdicts, the book runner, checks
"""
