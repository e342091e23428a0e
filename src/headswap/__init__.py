"""headswap: a frozen ImageNet body, a new trained head, as a DVC + Prefect + MLflow pipeline."""

import os

# Waiting OpenMP threads sleep instead of spinning. torch's CPU kernels (the head's L-BFGS fit)
# run on OpenMP, and spinning threads fight any other busy process for the cores. Measured on
# 2 cores, the default head fit on ELPV: beside a running test suite 8.2-15.9 s spinning against
# 5.1-6.0 s sleeping; on a quiet machine 4.8-4.9 s against 4.9-5.3 s. Eager torch at batch 32
# (the features stage's) is unchanged; at batch 1 it is slower, which no stage uses. It must be
# set before torch loads, as every headswap entry point does after importing this package; an
# OMP_WAIT_POLICY already in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
