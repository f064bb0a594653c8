"""One training loop for every launcher: in-process, Ray Train worker, Ray Tune trial.

- `loop`: the loop (`train_loop`: early stopping, then the refit), one step, and `fit_in_process`;
- `state`: what a run is at (`Phase`, `TrainState`) and produces (`TrainResult`);
- `reporting`: the `Reporter` a launcher hands the loop (`LocalReporter` in-process; the Ray ones in
  `ncf.integrations.ray_train`), the progress line, the figures the ranks share;
- `checkpoints`: checkpoint files, their checksums, loading, and the latest/previous rotation;
- `optimizer`: Adam, or `SparseDenseAdam` for sparse-gradient embedding tables;
- `batches`: where each epoch's batches come from, and the unrated movies drawn beside them;
- `validation`: the validation figures of every epoch, built by the launcher and handed to the loop.
"""
