"""The recommender served over HTTP by Ray Serve: JSON API, web page, model updates in place."""
