"""The Ray Serve app over real HTTP: every endpoint, bad inputs, cold start, `make serve`, and a model
update under traffic. One app per module (the `served_url` fixture); the update test runs last."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest
import yaml
from mlflow import MlflowClient
from ray.serve.schema import ServeDeploySchema
from services import serve_process

from ncf.config import load_config
from ncf.integrations import mlflow_tracking
from ncf.ports import free_port
from ncf.ranking import top_k_unseen
from ncf.recommender import Recommender
from serving.deployment import build_app
from serving.model_version import load_version, resolve_version
from serving.schemas import MAX_ID, RecommendationsOut

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]  # the repository


def seen_movies(recommender: Recommender, user_id: int) -> set[int]:
    user = recommender.user_indices([user_id])[0]
    return set(recommender.ids.movie_ids[recommender.history.movie[recommender.history.user == user]].tolist())


# ----------------------------------------------------------------------------- `make serve` (before the module's app)


def test_make_serve_without_a_model_says_how_to_make_one(tmp_path: Path):
    env = os.environ | {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'empty.db'}"}
    done = subprocess.run([sys.executable, "-m", "serving"], env=env, capture_output=True, text=True, timeout=120,
                          cwd=ROOT)
    assert done.returncode == 1
    assert "models:/ncf-movielens@champion" in done.stderr and "make train" in done.stderr
    assert "Traceback" not in done.stderr


def haproxy_processes(pid: int) -> list[psutil.Process]:
    """The HAProxy processes under `pid`. HAProxy reloads its config when routes or replicas change: the new
    process takes over the listeners and the old one lingers until its connections end, so there may be two."""
    return [p for p in psutil.Process(pid).children(recursive=True) if p.name() == "haproxy"]


def test_make_serve_behind_haproxy_answers_then_stops_cleanly_on_sigterm(model_store, champion: Recommender):
    """`make serve` with serve.ingress: haproxy, HAProxy in front of replicas that answer HTTP themselves: the
    model's answers and the same JSON errors as behind Ray Serve's proxy (the rest of this module), listening on
    serve.host only (its stats page and metrics too), and a clean stop on SIGTERM, HAProxy included."""
    port, stats_port, metrics_port = free_port(), free_port(), free_port()
    env = os.environ | {"MLFLOW_TRACKING_URI": model_store.uri, "RAY_SERVE_HAPROXY_STATS_PORT": str(stats_port),
                        "RAY_SERVE_HAPROXY_METRICS_PORT": str(metrics_port)}
    with serve_process(port, env, "serve.ingress=haproxy", "serve.warm_users=0") as process:
        haproxy = haproxy_processes(process.pid)
        assert haproxy, f"no HAProxy among {[p.name() for p in psutil.Process(process.pid).children(recursive=True)]}"
        # Its files (config, state, the admin socket) in a folder only this user reaches: <folder>/<node id>/...
        command = haproxy[-1].cmdline()
        config = Path(command[command.index("-f") + 1])
        assert config.parents[1].stat().st_mode & 0o077 == 0, config

        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            for user_id in (1, 2, 3):
                items = http.get("/recommend", params={"user_id": user_id}).json()["items"]
                assert [i["movie_id"] for i in items] == champion.recommend([user_id], 10)["movie_id"].tolist()
            for method, path, params, status, names in BAD_REQUESTS:
                assert_json_error(http.request(method, path, params=params), status, names)
            too_big = http.post("/predict", content=b"x" * (1 << 21), headers={"content-type": "application/json"})
            assert_json_error(too_big, 413, "max_body_bytes")

        # The API, HAProxy's stats page and its Prometheus metrics on serve.host only, the last two on the ports
        # the environment gave them.
        listening = {(c.laddr.ip, c.laddr.port) for p in haproxy_processes(process.pid)
                     for c in p.net_connections("tcp") if c.status == "LISTEN"}
        assert {("127.0.0.1", port), ("127.0.0.1", stats_port), ("127.0.0.1", metrics_port)} <= listening
        assert {ip for ip, _ in listening} == {"127.0.0.1"}, listening
        assert httpx.get(f"http://127.0.0.1:{stats_port}/stats", timeout=10).status_code == 200
        assert "haproxy_process" in httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
    # Stopped by SIGTERM, cleanly (serve_process checks that everything it started, HAProxy included, ended).
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
    assert not config.parents[1].exists()


# ----------------------------------------------------------------------------- answers


def test_recommend_gives_the_models_top_k_unseen_movies(http: httpx.Client, champion: Recommender):
    body = http.get("/recommend", params={"user_id": 1}).json()
    assert body["user_id"] == 1 and body["cold_start"] is False
    assert body["model_version"] == http.get("/version").json()["model_version"]
    assert body["variant"] == "champion"  # no experiment runs
    assert list(body) == list(RecommendationsOut.model_fields)
    items = body["items"]
    assert len(items) == 10
    expected = champion.recommend([1], 10)
    assert [i["movie_id"] for i in items] == expected["movie_id"].tolist()
    assert [i["title"] for i in items] == expected["title"].tolist()
    np.testing.assert_allclose([i["predicted_rating"] for i in items], expected["predicted_rating"], rtol=1e-5)
    assert not {i["movie_id"] for i in items} & seen_movies(champion, 1)
    for item in items:
        assert set(item) == {"movie_id", "title", "genres", "predicted_rating", "strength", "user_weight",
                             "movie_weight"}
        assert item["user_weight"] + item["movie_weight"] == pytest.approx(1, abs=1e-5)
        assert 0 <= item["strength"] <= 1
        assert item["predicted_rating"] == pytest.approx(0.5 + 4.5 * item["strength"], abs=1e-4)
    # Retrieval then re-ranking: every item is among the retriever's candidates for this user.
    user = champion.user_indices([1])
    width = max(champion.reranking.n_candidates, 10)
    candidates = champion.ids.movie_ids[top_k_unseen(champion.candidates.score, user, champion.seen, width)[0][0]]
    assert {i["movie_id"] for i in items} <= set(candidates.tolist())


def test_users_with_different_histories_get_different_lists(http: httpx.Client, champion: Recommender):
    """The mean overlap of top-10 lists across 60 users (shared movies / 10, over all pairs): a rating
    regressor alone gives nearly everyone the same ten obscure movies; retrieval makes lists personal."""
    users = champion.ids.user_ids[::10][:60].tolist()
    lists = [{i["movie_id"] for i in http.get("/recommend", params={"user_id": u}).json()["items"]} for u in users]
    overlaps = [len(a & b) / 10 for i, a in enumerate(lists) for b in lists[i + 1:]]
    mean_overlap = float(np.mean(overlaps))
    print(f"mean top-10 overlap across {len(users)} users ({len(overlaps)} pairs): {mean_overlap:.3f}; "
          f"distinct movies in all lists: {len(set().union(*lists))}")
    assert mean_overlap < 0.3
    assert len(set().union(*lists)) >= 100


def test_recommend_k_is_a_prefix_of_a_longer_list(http: httpx.Client):
    top100 = http.get("/recommend", params={"user_id": 7, "k": 100}).json()["items"]
    top3 = http.get("/recommend", params={"user_id": 7, "k": 3}).json()["items"]
    assert len(top100) == 100 and top3 == top100[:3]


def test_concurrent_first_requests_match_the_model(http: httpx.Client, champion: Recommender):
    """Users asked for at once are scored in shared batches; each still gets exactly its own answer."""
    counts = np.bincount(champion.history.user)
    users = champion.ids.user_ids[np.argsort(counts, kind="stable")[:24]].tolist()  # least active: not warmed
    results: dict[int, list[int]] = {}

    def ask(user: int) -> None:
        results[user] = [i["movie_id"] for i in http.get("/recommend", params={"user_id": user}).json()["items"]]

    threads = [threading.Thread(target=ask, args=(u,)) for u in users]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    expected = champion.recommend(users, 10)
    for user in users:
        assert results[user] == expected[expected["user_id"] == user]["movie_id"].tolist()


def test_ranking_cache_keeps_the_most_recently_asked_for_users(model_store, champion: Recommender):
    uri = f"models:/{mlflow_tracking.MODEL_NAME}/{model_store.champion}"
    served = load_version(resolve_version(uri, MlflowClient()), cache_users=3)
    first = served.rank([0, 1, 2])
    assert list(served.rankings) == [0, 1, 2]
    assert served.cached(0) is first[0]  # asking again moves user 0 to the recent end
    served.rank([3, 4])
    assert list(served.rankings) == [0, 3, 4]
    again = served.rank([1])[1]  # evicted, so computed again: the same answer
    np.testing.assert_array_equal(again.movies, first[1].movies)
    expected = champion.recommend(champion.ids.user_ids[[1]].tolist(), 100)["movie_id"].to_numpy()
    np.testing.assert_array_equal(champion.ids.movie_ids[again.movies], expected)
    assert list(served.rankings) == [3, 4, 1]


@pytest.mark.parametrize("user_id", [0, 99_999_999, MAX_ID])
def test_unknown_user_gets_popular_movies_flagged_cold_start(http: httpx.Client, champion: Recommender, user_id):
    body = http.get("/recommend", params={"user_id": user_id, "k": 5}).json()
    assert body["cold_start"] is True and body["user_id"] == user_id
    assert [i["movie_id"] for i in body["items"]] == champion.ids.movie_ids[champion.popular(5)].tolist()
    for item in body["items"]:
        assert (item["user_weight"], item["movie_weight"]) == (0.0, 1.0)
        assert 0.5 <= item["predicted_rating"] <= 5.0


@pytest.mark.parametrize("params", [{"user_id": 1, "k": 100}, {"user_id": 3, "k": 7}, {"user_id": 0, "k": 3}])
def test_recommend_body_is_byte_for_byte_what_its_schema_writes(http: httpx.Client, params: dict):
    """/recommend writes its body from pieces serialised once per version, not through the schema per request."""
    response = http.get("/recommend", params=params)
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    assert response.content == RecommendationsOut.model_validate_json(response.content).model_dump_json().encode()


def test_a_repeated_recommend_is_replayed_byte_for_byte(http: httpx.Client):
    """A /recommend query answered with 200 is answered again with the same bytes from the replica's answers
    (`cached_answers` counts them); another query string is another answer, and errors are never kept.
    (The model update test checks that a new version starts without its predecessor's answers.)"""
    params = {"user_id": 11, "k": 6}
    held = http.get("/healthz").json()["cached_answers"]
    first = http.get("/recommend", params=params)
    assert http.get("/healthz").json()["cached_answers"] == held + 1
    again = http.get("/recommend", params=params)
    assert again.status_code == first.status_code == 200 and again.content == first.content
    assert {k: again.headers[k] for k in ("content-type", "content-length")} == {
        k: first.headers[k] for k in ("content-type", "content-length")}
    assert http.get("/recommend", params={"k": 6, "user_id": 11}).content == first.content  # computed, then kept
    for _ in range(2):
        assert_json_error(http.get("/recommend", params={"user_id": 11, "k": 0}), 422, "k")
    assert http.get("/healthz").json()["cached_answers"] == held + 2


def test_explain_gives_weights_and_the_users_closest_liked_movies(http: httpx.Client, champion: Recommender):
    top = http.get("/recommend", params={"user_id": 1, "k": 1}).json()["items"][0]
    body = http.get("/explain", params={"user_id": 1, "movie_id": top["movie_id"]}).json()
    assert body["predicted_rating"] == pytest.approx(top["predicted_rating"], abs=1e-4)
    assert body["user_weight"] + body["movie_weight"] == pytest.approx(1, abs=1e-5)
    assert body["user_weight"] == pytest.approx(top["user_weight"], abs=1e-5)
    because = body["because_you_rated"]
    assert 1 <= len(because) <= 5
    user = champion.user_indices([1])[0]
    own = {int(champion.ids.movie_ids[m]): float(r) for m, r in zip(
        champion.history.movie[champion.history.user == user], champion.history.rating[champion.history.user == user],
        strict=True)}
    for b in because:
        assert own[b["movie_id"]] == b["rating"] >= 4.0
    similarities = [b["similarity"] for b in because]
    assert similarities == sorted(similarities, reverse=True)
    movie = champion.movie_indices([top["movie_id"]])[0]
    np.testing.assert_allclose(similarities, champion.movie_similarity(
        movie, champion.movie_indices([b["movie_id"] for b in because])), rtol=1e-4, atol=1e-6)
    assert set(body["shared_genres"]) <= set(top["genres"])
    # The retriever's evidence: the user's own ratings behind the movie's retrieval score, strongest first.
    assert body["retriever"] == champion.candidates.name
    evidence = body["retrieved_because_you_rated"]
    assert 1 <= len(evidence) <= 5
    movies, shares = champion.retrieval_evidence(champion.profiles_of([user]), movie)
    assert [e["movie_id"] for e in evidence] == champion.ids.movie_ids[movies[:5]].tolist()
    np.testing.assert_allclose([e["weight"] for e in evidence], shares[:5], rtol=1e-5)
    for e in evidence:
        assert own[e["movie_id"]] == e["rating"] >= 4.0  # retrieval learns from ratings >= 4
    # The sequence signal's evidence: the user's latest ratings, whatever their value, that others followed with it.
    rated_next = body["rated_next_after"]
    assert 1 <= len(rated_next) <= 5
    movies, shares = champion.sequence_evidence(champion.profiles_of([user]), movie)
    assert [e["movie_id"] for e in rated_next] == champion.ids.movie_ids[movies[:5]].tolist()
    np.testing.assert_allclose([e["weight"] for e in rated_next], shares[:5], rtol=1e-5)
    assert all(own[e["movie_id"]] == e["rating"] for e in rated_next)


def test_predict_pairs_match_the_model(http: httpx.Client, champion: Recommender):
    pairs = [{"user_id": 1, "movie_id": 1}, {"user_id": 2, "movie_id": 318}, {"user_id": 610, "movie_id": 1}]
    body = http.post("/predict", json={"pairs": pairs}).json()
    expected = champion.predict_pairs([p["user_id"] for p in pairs], [p["movie_id"] for p in pairs])
    assert [(p["user_id"], p["movie_id"]) for p in body["predictions"]] == [(1, 1), (2, 318), (610, 1)]
    for column in ("predicted_rating", "strength", "user_weight", "movie_weight"):
        np.testing.assert_allclose([p[column] for p in body["predictions"]], expected[column], rtol=1e-5)
    assert http.post("/predict", json={"pairs": []}).json()["predictions"] == []


def test_predict_takes_ten_thousand_pairs(http: httpx.Client, champion: Recommender):
    rng = np.random.default_rng(0)
    users = rng.choice(champion.ids.user_ids, 10_000)
    movies = rng.choice(champion.ids.movie_ids, 10_000)
    pairs = [{"user_id": int(u), "movie_id": int(m)} for u, m in zip(users, movies, strict=True)]
    response = http.post("/predict", json={"pairs": pairs})
    assert response.status_code == 200
    assert len(response.json()["predictions"]) == 10_000


def test_history_lists_the_users_ratings_most_recent_first(http: httpx.Client, champion: Recommender):
    body = http.get("/users/1/history").json()
    assert body["user_id"] == 1
    assert {r["movie_id"] for r in body["ratings"]} == seen_movies(champion, 1)
    stamps = [r["timestamp"] for r in body["ratings"]]
    assert stamps == sorted(stamps, reverse=True)
    assert all(0.5 <= r["rating"] <= 5 and r["title"] for r in body["ratings"])


def test_users_lists_every_known_user(http: httpx.Client, champion: Recommender):
    body = http.get("/users", params={"limit": 5}).json()
    assert body["count"] == champion.ids.n_users == 610
    assert [u["user_id"] for u in body["users"]] == champion.ids.user_ids[:5].tolist()
    assert body["users"][0]["n_ratings"] == len(seen_movies(champion, int(champion.ids.user_ids[0])))


def test_movie_search_finds_titles_most_rated_first(http: httpx.Client):
    body = http.get("/movies/search", params={"q": "toy story"}).json()
    titles = [m["title"] for m in body["movies"]]
    assert titles[0] == "Toy Story (1995)" and {"Toy Story 2 (1999)", "Toy Story 3 (2010)"} <= set(titles)
    assert http.get("/movies/search", params={"q": "no such title zzz"}).json()["movies"] == []


def test_version_and_health(http: httpx.Client, model_store):
    version = http.get("/version").json()
    assert version["model_name"] == "ncf-movielens"
    assert version["run_id"] and version["loaded_at"]
    assert version["model_uri"] == f"models:/ncf-movielens/{version['model_version']}"
    health = http.get("/healthz").json()
    assert health["status"] == "ok" and health["model_version"] == version["model_version"]


def test_openapi_schema_lists_every_json_endpoint(http: httpx.Client):
    paths = http.get("/openapi.json").json()["paths"]
    assert {"/recommend", "/explain", "/predict", "/users", "/users/{user_id}/history", "/movies/search",
            "/healthz", "/version"} <= set(paths)


def test_page_is_served_and_self_contained(http: httpx.Client):
    response = http.get("/")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    assert "<script>" in response.text
    assert "http://" not in response.text and "https://" not in response.text  # nothing from the internet


# ----------------------------------------------------------------------------- bad inputs


TOO_BIG = str(2**64)
BAD_REQUESTS = [
    ("GET", "/recommend", {"user_id": -1}, 422, "user_id"),
    ("GET", "/recommend", {"user_id": str(MAX_ID + 1)}, 422, "user_id"),
    ("GET", "/recommend", {"user_id": TOO_BIG}, 422, "user_id"),
    ("GET", "/recommend", {"user_id": "abc"}, 422, "user_id"),
    ("GET", "/recommend", {"user_id": "1.5"}, 422, "user_id"),
    ("GET", "/recommend", {}, 422, "user_id"),
    ("GET", "/recommend", {"user_id": 1, "k": 0}, 422, "k"),
    ("GET", "/recommend", {"user_id": 1, "k": 10**6}, 422, "k"),
    ("GET", "/recommend", {"user_id": 1, "k": -3}, 422, "k"),
    ("GET", "/recommend", {"user_id": 1, "k": "ten"}, 422, "k"),
    ("GET", "/explain", {"user_id": 1}, 422, "movie_id"),
    ("GET", "/explain", {"movie_id": 1}, 422, "user_id"),
    ("GET", "/explain", {"user_id": 1, "movie_id": -5}, 422, "movie_id"),
    ("GET", "/explain", {"user_id": 1, "movie_id": TOO_BIG}, 422, "movie_id"),
    ("GET", "/explain", {"user_id": "x", "movie_id": 1}, 422, "user_id"),
    ("GET", "/explain", {"user_id": 1, "movie_id": 999_999_999}, 404, "unknown movie id"),
    ("GET", "/explain", {"user_id": 999_999, "movie_id": 1}, 404, "unknown user id"),
    ("GET", "/users/abc/history", {}, 422, "user_id"),
    ("GET", "/users/-1/history", {}, 422, "user_id"),
    ("GET", f"/users/{TOO_BIG}/history", {}, 422, "user_id"),
    ("GET", "/users/999999/history", {}, 404, "unknown user id"),
    ("GET", "/users", {"limit": 0}, 422, "limit"),
    ("GET", "/movies/search", {}, 422, "q"),
    ("GET", "/movies/search", {"q": ""}, 422, "q"),
    ("GET", "/movies/search", {"q": "   "}, 422, "q"),
    ("GET", "/movies/search", {"q": "toy", "limit": 1000}, 422, "limit"),
    ("GET", "/no/such/endpoint", {}, 404, "Not Found"),
    ("GET", "/predict", {}, 405, "Method Not Allowed"),
]
BAD_BODIES = [
    ('{"pairs": [', 422, "JSON"),
    ("not json at all", 422, "JSON"),
    ("", 422, "body"),
    ("{}", 422, "pairs"),
    ('{"pairs": "all"}', 422, "pairs"),
    ('{"pairs": [{"user_id": 1}]}', 422, "pairs.0.movie_id"),
    ('{"pairs": [{"user_id": -1, "movie_id": 1}]}', 422, "pairs.0.user_id"),
    (f'{{"pairs": [{{"user_id": 1, "movie_id": {TOO_BIG}}}]}}', 422, "pairs.0.movie_id"),
    ('{"pairs": [{"user_id": "one", "movie_id": 1}]}', 422, "pairs.0.user_id"),
    ('{"pairs": [{"user_id": 1, "movie_id": 999999999}]}', 404, "999999999"),
    ('{"pairs": [{"user_id": 123456, "movie_id": 1}]}', 404, "123456"),
    ('{"pairs": [' + ",".join(['{"user_id": 1, "movie_id": 1}'] * 10_001) + "]}", 422, "pairs"),
]


def assert_json_error(response: httpx.Response, status: int, names: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert names in response.json()["error"], response.text
    assert "Traceback" not in response.text


@pytest.mark.parametrize(("method", "path", "params", "status", "names"), BAD_REQUESTS)
def test_bad_request_is_a_json_4xx_naming_the_problem(http: httpx.Client, method, path, params, status, names):
    assert_json_error(http.request(method, path, params=params), status, names)


@pytest.mark.parametrize(("body", "status", "names"), BAD_BODIES)
def test_bad_predict_body_is_a_json_4xx_naming_the_problem(http: httpx.Client, body, status, names):
    response = http.post("/predict", content=body, headers={"content-type": "application/json"})
    assert_json_error(response, status, names)


# ----------------------------------------------------------------------------- config for `serve deploy`


def test_serve_deploy_config_is_valid_and_matches_conf():
    spec = yaml.safe_load((ROOT / "serving" / "serve_config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(spec)
    serve_conf = load_config().serve
    assert (schema.http_options.host, schema.http_options.port) == (serve_conf.host, serve_conf.port)
    (app,) = schema.applications
    assert app.import_path == "serving.deployment:build_app" and app.route_prefix == "/"
    deployment = build_app(app.args)._bound_deployment
    assert deployment._deployment_config.autoscaling_config.max_replicas == serve_conf.max_replicas
    assert deployment._deployment_config.max_ongoing_requests == serve_conf.max_ongoing_requests


# ----------------------------------------------------------------------------- model update (last: moves the champion)


def test_new_champion_is_served_without_a_failed_request(http: httpx.Client, model_store,
                                                         champion: Recommender):
    old = http.get("/version").json()["model_version"]
    new = model_store.register_tiny_model(seed=2)
    answers: list[tuple[float, str]] = []
    failures: list[str] = []
    stop = threading.Event()

    def client() -> None:
        users = list(champion.ids.user_ids) + [0]  # cached, uncached and cold-start users
        with httpx.Client(base_url=str(http.base_url), timeout=30) as own:
            i = 0
            while not stop.is_set():
                try:
                    response = own.get("/recommend", params={"user_id": int(users[i % len(users)])})
                    if response.status_code == 200:
                        answers.append((time.monotonic(), response.json()["model_version"]))
                    else:
                        failures.append(f"{response.status_code} {response.text[:200]}")
                except httpx.HTTPError as err:
                    failures.append(repr(err))
                i += 7

    thread = threading.Thread(target=client)
    thread.start()
    try:
        time.sleep(1)
        promoted_at = time.monotonic()
        mlflow_tracking.promote(mlflow_tracking.MODEL_NAME, new)
        deadline = time.monotonic() + 60
        while http.get("/version").json()["model_version"] != new and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1)
    finally:
        stop.set()
        thread.join(timeout=60)
    assert not failures, failures[:5]
    versions = [v for _, v in answers]
    assert versions[0] == old and versions[-1] == new, "the new champion was not served within 60 s"
    switch = versions.index(new)
    assert set(versions[switch:]) == {new}, "answers went back to the old version"
    assert any(t > promoted_at for t, _ in answers[:switch]), "no request was answered while the update loaded"
    # The new weights answer, not just the new label.
    expected = model_store.recommender(new).recommend([1], 10)["movie_id"].tolist()
    assert [i["movie_id"] for i in http.get("/recommend", params={"user_id": 1}).json()["items"]] == expected
