"""The only place in `ncf` that talks to Ray and MLflow.

The core modules beside this package compute and import neither; jobs/ and serving/
reach Ray and MLflow through the modules here:
- `ray_train`: joining or starting a Ray cluster, the Ray Train launcher, the reporters
  the training loop gets inside a Ray Train worker or a Ray Tune trial;
- `mlflow_tracking`: the store, what a run records, the registered recommender model
  and the champion alias.
"""
