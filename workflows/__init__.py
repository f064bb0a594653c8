"""What the entry points in `jobs/` share: publishing a finished training (`publish`), the champion gate
(`champion`), a sweep's trials and its report (`sweep_trials`, `sweep_report`) and the deployment checker
(`deployment`).

Unlike the core `ncf/*`, these modules drive MLflow and Ray; the core never imports them, and neither
does `serving/`.
"""
