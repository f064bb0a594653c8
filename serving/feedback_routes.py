"""The write side of the HTTP API: ratings posted by users (`POST /ratings`), new users (`POST /users`) and the
movies a new user is asked to rate (`GET /onboarding`). A rating is acknowledged only once the ratings store has
committed it; its event id makes a retried post change nothing."""

from __future__ import annotations

import hmac
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Depends, Query
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException

from ncf.feedback_store import RatingEvent
from serving.live_ratings import merged_profile, rejections
from serving.replica import current_replica
from serving.schemas import MAX_ID, MAX_K, ErrorOut, NewUserIn, NewUserOut, OnboardingOut, RatingsIn, RatingsOut

RETRY_AFTER_S = 5  # what a 503 asks the client to wait before retrying
STORE_DOWN = {503: {"model": ErrorOut, "description": "the ratings store is unavailable: nothing was acknowledged; "
                                                     "retry after the Retry-After header's seconds"}}
WRITE_ERRORS = {401: {"model": ErrorOut, "description": "a write without the bearer token NCF_API_TOKEN"}} | STORE_DOWN
LOOPBACK = ("127.0.0.1", "::1", "localhost")  # serve.host values that keep the app to this machine
bearer = HTTPBearer(auto_error=False, description="NCF_API_TOKEN: needed for writes when it is set or the service "
                                                  "listens beyond loopback")
router = APIRouter()


def writer(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> None:
    """Writes need `Authorization: Bearer $NCF_API_TOKEN` when the token is set, and are refused altogether when
    the service listens beyond loopback without one: nobody else may write users' ratings."""
    replica = current_replica()
    token = replica.api_token
    if token is None:
        if replica.loopback_only:
            return
        raise HTTPException(401, "writes are disabled: the service may be reached beyond loopback and NCF_API_TOKEN "
                                 "is not set", headers={"WWW-Authenticate": "Bearer"})
    given = credentials.credentials if credentials is not None else ""
    if not hmac.compare_digest(given.encode(), token.encode()):
        raise HTTPException(401, "writes need the header Authorization: Bearer <NCF_API_TOKEN>",
                            headers={"WWW-Authenticate": "Bearer"})


@router.post("/ratings", response_model=RatingsOut, responses=WRITE_ERRORS, dependencies=[Depends(writer)])
def post_ratings(body: RatingsIn) -> dict:
    """Store users' ratings (1 to 1,000): each is stored, a duplicate of an event id stored before (nothing
    changes), or rejected with its reason. Answered once the stored ones are committed; their users' next
    recommendations already follow them. A later rating of the same movie counts instead of the earlier one."""
    replica = current_replica()
    store, rec = replica.store(), replica.served.recommender
    events = [RatingEvent(r.event_id, r.user_id, r.movie_id, r.rating, r.timestamp, r.rec_id) for r in body.ratings]
    new_users = {e.user_id for e in events if rec.user_index(e.user_id) is None}
    reasons = rejections(events, rec, replica.served.scale, store.registered(new_users) if new_users else set())
    statuses = iter(store.add([e for e, reason in zip(events, reasons, strict=True) if reason is None]))
    return {"results": [{"event_id": e.event_id, "status": "rejected" if reason else next(statuses), "reason": reason}
                        for e, reason in zip(events, reasons, strict=True)]}


@router.post("/users", response_model=NewUserOut, responses=WRITE_ERRORS, dependencies=[Depends(writer)])
def post_users(body: NewUserIn | None = None) -> dict:
    """A new user: an id above every id of the dataset, never given out again. Rate movies for it with
    POST /ratings (GET /onboarding suggests some); recommendations follow from the first rating."""
    replica = current_replica()
    return {"user_id": replica.store().new_user(floor=int(replica.served.recommender.ids.user_ids.max()))}


@router.get("/onboarding", response_model=OnboardingOut, responses=STORE_DOWN)
def onboarding(user_id: Annotated[int | None, Query(ge=0, le=MAX_ID, description="leave out what they rated")] = None,
               k: Annotated[int, Query(ge=1, le=MAX_K)] = 20) -> dict:
    """Movies to ask a new user to rate: popular ones, spread across genres, none the user has rated."""
    replica = current_replica()
    served = replica.served
    rated = (np.zeros(0, dtype=np.int64) if user_id is None else
             merged_profile(served.recommender, user_id, replica.store().ratings_of(user_id)).ratings.movie)
    return {"user_id": user_id, "items": [served.movie(m) for m in served.recommender.onboarding(k, rated)]}
