"""What the host and the kernels share: the norm kinds, the statistics rows the forward saves,
the column sums the backward writes. Plain Python (no Triton): the host's op description
(zeta_fused/op/args.py) imports it, so the kernels never import host code."""

# Norm kinds of the op: the op's strings, which the kernels take as NORM constexprs. A
# LayerNorm centres and scales, t̂ = (t - mean) * rstd; an RMSNorm only scales, t̂ = t * rstd
# (its mean is 0 wherever the statistics hold one).
NO_NORM = "none"
LAYER_NORM = "layer_norm"
RMS_NORM = "rms_norm"
NORM_KINDS = (NO_NORM, LAYER_NORM, RMS_NORM)
# The forward's per-token row statistics, saved for the backward: a (len(STAT_ROWS), B*N)
# buffer in the accumulation dtype (kernels/norms.py names the rows for the kernels). A norm
# that is off stores mean 0 and rstd 1, an RMSNorm mean 0.
STAT_ROWS = ("mean1", "rstd1", "mean2", "rstd2", "mean3", "rstd3")
# The backward's per-program column sums over D, summed by the launcher: rows of a
# (len(COLUMN_SUMS), programs, D) buffer (dZ -> dbias, dT * ẑ -> dg2, dT -> db2, dY * t̂ -> dg3,
# dY -> db3).
COLUMN_SUMS = ("dz", "dg2", "db2", "dg3", "db3")
