"""Inference: one subset's de-biased fit (``local``), pooling with heterogeneity (``pooling``),
the tests of candidate splits (``split_tests``) and the coefficient tables (``results``)."""
