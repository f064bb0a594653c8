"""Live ratings over real HTTP and a real ratings store (the session's SQLite file, NCF_FEEDBACK_URI): ratings posted
to /ratings are acknowledged once committed, idempotent by event id, rejected with their reason, and change the
user's /recommend, /explain and history from the next request; new users are created, onboarded and personalised.
One app for the module (the `served_url` fixture)."""

from __future__ import annotations

import os
import time
import uuid

import httpx
import pytest

from ncf.feedback_store import RatingsStore
from ncf.integrations import mlflow_tracking
from ncf.recommender import Recommender

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def http(served_url: str):
    with httpx.Client(base_url=served_url, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def champion(model_store) -> Recommender:
    return model_store.recommender(model_store.champion)


def event(user_id: int, movie_id: int, rating: float, **extra) -> dict:
    return {"event_id": str(uuid.uuid4()), "user_id": user_id, "movie_id": movie_id, "rating": rating} | extra


def post(http: httpx.Client, *events: dict) -> list[dict]:
    response = http.post("/ratings", json={"ratings": list(events)})
    assert response.status_code == 200, response.text
    return response.json()["results"]


def shown(http: httpx.Client, user_id: int, k: int = 10) -> list[int]:
    return [item["movie_id"] for item in http.get("/recommend", params={"user_id": user_id, "k": k}).json()["items"]]


def test_a_rated_movie_leaves_the_list_at_once_and_enters_the_history(http: httpx.Client):
    before = http.get("/recommend", params={"user_id": 3, "k": 10}).json()
    top = before["items"][0]["movie_id"]
    assert before["rec_id"] and http.get("/recommend", params={"user_id": 3, "k": 10}).json() == before  # replayed
    results = post(http, event(3, top, 4.5, rec_id=before["rec_id"]))
    assert results[0]["status"] == "stored" and results[0]["reason"] is None
    after = http.get("/recommend", params={"user_id": 3, "k": 10}).json()
    assert top not in [item["movie_id"] for item in after["items"]] and not after["cold_start"]
    assert after["rec_id"] != before["rec_id"]
    latest = http.get("/users/3/history").json()["ratings"][0]
    assert (latest["movie_id"], latest["rating"], latest["source"]) == (top, 4.5, "live")


def test_a_retried_event_is_a_duplicate_and_changes_nothing(http: httpx.Client, champion: Recommender):
    movie = int(champion.ids.movie_ids[champion.popular(300)[-1]])
    first = event(5, movie, 2.0)
    assert post(http, first)[0]["status"] == "stored"
    again = post(http, first, first | {"rating": 5.0})
    assert [r["status"] for r in again] == ["duplicate", "duplicate"]
    live = [r for r in http.get("/users/5/history").json()["ratings"] if r["source"] == "live"]
    assert [(r["movie_id"], r["rating"]) for r in live] == [(movie, 2.0)]


def test_a_later_rating_of_the_same_movie_replaces_the_earlier_one_both_kept(http: httpx.Client,
                                                                            champion: Recommender):
    movie = int(champion.ids.movie_ids[champion.popular(400)[-1]])
    post(http, event(6, movie, 1.0, timestamp=2_000_000_000))
    post(http, event(6, movie, 5.0, timestamp=2_000_000_100))
    live = [r for r in http.get("/users/6/history").json()["ratings"] if r["source"] == "live"]
    assert [r["rating"] for r in live] == [5.0, 1.0]  # most recent first, both kept
    explained = http.get("/explain", params={"user_id": 6, "movie_id": shown(http, 6)[0]}).json()
    liked = [r for r in explained["because_you_rated"] if r["movie_id"] == movie]
    assert all(r["rating"] == 5.0 and r["source"] == "live" for r in liked)


@pytest.mark.parametrize(("change", "reason"), [
    ({"rating": 5.5}, "off the scale"), ({"rating": 0.0}, "off the scale"), ({"rating": 3.25}, "not a multiple"),
    ({"movie_id": 999_999_999}, "unknown movie"), ({"user_id": 999_999_999}, "unknown user")])
def test_each_rejection_names_its_reason_and_stores_nothing(http: httpx.Client, change: dict, reason: str):
    good, bad = event(7, 1, 4.0), event(7, 2, 4.0) | change
    results = post(http, bad, good)
    assert results[0]["status"] == "rejected" and reason in results[0]["reason"], results
    assert results[1]["status"] == "stored"
    assert results[0]["event_id"] not in {r.event_id for r in stored_events()}


def stored_events() -> list:
    """What the app's ratings store holds, read behind the API's back."""
    store = RatingsStore(os.environ["NCF_FEEDBACK_URI"])
    try:
        return store.ratings()
    finally:
        store.close()


@pytest.mark.parametrize("body", [{}, {"ratings": []}, {"ratings": [{"event_id": "x", "user_id": 1}]},
                                  {"ratings": [event(1, 1, 4.0)] * 1001}, {"ratings": [event(1, 1, 4.0) | {"x": 1}]},
                                  {"ratings": [event(1, 1, 4.0) | {"event_id": ""}]}])
def test_a_bad_body_is_refused_before_anything_is_written(http: httpx.Client, body: dict):
    before = len(stored_events())
    response = http.post("/ratings", json=body)
    assert response.status_code == 422 and set(response.json()) == {"error"}
    assert len(stored_events()) == before


def test_a_new_user_is_onboarded_then_personalised(http: httpx.Client, champion: Recommender):
    first, second = http.post("/users").json()["user_id"], http.post("/users", json={}).json()["user_id"]
    assert second > first > int(champion.ids.user_ids.max())
    assert http.get(f"/users/{first}/history").json() == {"user_id": first, "ratings": []}
    cold = http.get("/recommend", params={"user_id": first}).json()
    assert cold["cold_start"]
    onboarding = http.get("/onboarding", params={"user_id": first, "k": 20}).json()["items"]
    assert len(onboarding) == 20 and len({m["movie_id"] for m in onboarding}) == 20
    genres = {m["genres"][0] for m in onboarding if m["genres"]}
    assert len(genres) >= 5, "onboarding should spread across genres"
    rated = [m["movie_id"] for m in onboarding[:5]]
    assert all(r["status"] == "stored" for r in post(http, *(event(first, m, s) for m, s in
                                                              zip(rated, [5.0, 4.5, 1.0, 4.0, 2.0], strict=True))))
    personal = http.get("/recommend", params={"user_id": first, "k": 10}).json()
    assert not personal["cold_start"]
    assert not set(rated) & {item["movie_id"] for item in personal["items"]}
    assert [item["movie_id"] for item in personal["items"]] != [item["movie_id"] for item in cold["items"]]
    assert not set(rated) & {m["movie_id"] for m in http.get(
        "/onboarding", params={"user_id": first, "k": 20}).json()["items"]}
    weights = [(i["user_weight"], i["movie_weight"]) for i in personal["items"]]
    assert all(abs(u + m - 1) < 1e-5 and u > 0 for u, m in weights), "the folded-in user side speaks"
    explained = http.get("/explain", params={"user_id": first, "movie_id": personal["items"][0]["movie_id"]}).json()
    evidence = explained["retrieved_because_you_rated"] + explained["because_you_rated"]
    assert evidence and {e["source"] for e in evidence} == {"live"}
    # The API's list is the recommender's own ranking of the same profile, folded in.
    profile = champion.profile(rated, [5.0, 4.5, 1.0, 4.0, 2.0], user_id=first)
    movies, _ = champion.rank_profiles(profile, 10, user_side=champion.fold_in(profile))
    assert [item["movie_id"] for item in personal["items"]] == champion.ids.movie_ids[movies[0]].tolist()


def test_an_unregistered_unknown_user_stays_cold_and_has_no_history(http: httpx.Client):
    assert http.get("/recommend", params={"user_id": 888_888_888}).json()["cold_start"]
    assert http.get("/users/888888888/history").status_code == 404


def test_a_new_champion_serves_every_live_rating_from_its_first_request(http: httpx.Client, model_store):
    """Live ratings belong to the user, not to a model version: after a swap they still shape the list."""
    user = http.post("/users").json()["user_id"]
    onboarding = [m["movie_id"] for m in http.get("/onboarding", params={"user_id": user}).json()["items"]][:4]
    post(http, *(event(user, m, 4.5) for m in onboarding))
    before = shown(http, user)
    old = http.get("/version").json()["model_version"]
    new = model_store.register_tiny_model(seed=3)
    mlflow_tracking.promote(mlflow_tracking.MODEL_NAME, new)
    try:
        deadline = time.monotonic() + 90
        while http.get("/version").json()["model_version"] == old and time.monotonic() < deadline:
            time.sleep(0.2)
        answer = http.get("/recommend", params={"user_id": user}).json()
        assert answer["model_version"] == new and not answer["cold_start"]
        assert not set(onboarding) & {i["movie_id"] for i in answer["items"]}
        newer = model_store.recommender(new)
        profile = newer.profile(onboarding, [4.5] * 4, user_id=user)
        movies, _ = newer.rank_profiles(profile, 10, user_side=newer.fold_in(profile))
        assert [i["movie_id"] for i in answer["items"]] == newer.ids.movie_ids[movies[0]].tolist()
        assert before  # the old version answered too
    finally:
        mlflow_tracking.promote(mlflow_tracking.MODEL_NAME, model_store.champion)
        deadline = time.monotonic() + 90
        while http.get("/version").json()["model_version"] != model_store.champion and time.monotonic() < deadline:
            time.sleep(0.2)

