"""The guidance study: every guidance method of the sampler, tuned on one seed set and reported on
others under one protocol.

`protocol` fixes what is sampled and scored (steps, seed sets, labels, result files); `grids` holds
the study's rows (a registry method and its tuning grid); `runner` tunes, reports and pairs them,
resumably; `report` turns the results into markdown, plots and image grids. The command line is
`experiments/study.py`.
"""
