"""The numerical core: the cumulative-logit likelihood over original rows, the solvers, the
standardisation of the features, row blocks, and the linear algebra of the statistics."""
