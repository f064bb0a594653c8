"""The MovieLens family's published files: a registry of the datasets and their formats (`specs`), a typed,
verified reader for each format (`ratings`, `movies`) and the verification of a dataset (`verification`).

Every reader returns the same two typed frames, whatever the published format:

- ratings: userId int32, movieId int32, rating float32, timestamp int64 (file order);
- movies: movieId int32, title str, genres str ('|'-joined, "(no genres listed)" when none).

Where each dataset comes from and what it is checked against (archive URL, SHA-256 digests, published
sizes) is config: `data.datasets` in conf/data.yaml; this package holds how each one is read. The
in-memory dataset these files become is `ncf.data.MovieLens`.

Pure computing code: no Ray, no MLflow.
"""
