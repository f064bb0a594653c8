"""The only place in `ncf` that talks to Ray and MLflow.

The core modules beside this package compute and import neither; jobs/ and serving/
reach Ray and MLflow through the modules here:
- `ray_cluster`: joining or starting a Ray cluster, and refusing at once what it cannot hold;
- `ray_train`: the Ray Train launcher, the reporters the training loop gets inside a Ray Train
  worker or a Ray Tune trial;
- `ray_data`: the training input streamed from the prepared Parquet, and full ranking by actors;
- `mlflow_tracking`: the store, what a run records, the registered recommender model
  and the champion alias;
- `experiments`: the online experiment (champion vs `challenger` alias): its MLflow runs and the promotion
  decision.
"""
