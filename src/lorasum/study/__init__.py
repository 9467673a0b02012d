"""The paper's study: the experiment config, the grid of partitions and models, its jobs, the runner, results and
the verdicts on the paper's claims, and tuning inside an experiment."""
