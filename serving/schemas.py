"""The HTTP API's request and response bodies (they make the OpenAPI schema at /docs)."""

from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

MAX_K = 100  # the API's limit on k, and the length of each cached ranking
MAX_PAIRS = 10_000
# Ids are int64 inside the model; the API takes those up to 2**53 - 1, the largest integer a JSON number holds
# exactly (JavaScript's Number.MAX_SAFE_INTEGER), so that every client and JSON Schema validator compares
# ids with this bound exactly (to one comparing floats, 2**63 - 1 is 2**63 and admits ids past int64).
MAX_ID = 2**53 - 1
MAX_RATINGS = 1_000  # events per POST /ratings
MAX_TEXT = 200  # characters of an event id or a rec_id


class Movie(BaseModel):
    movie_id: int
    title: str
    genres: list[str]


class Scored(BaseModel):
    predicted_rating: float = Field(description="the rating head's prediction, in the rating range; a model "
                                                "trained on interactions alone (objective implicit) has no rating "
                                                "head and shows its strength on the rating scale")
    strength: float = Field(description="recommendation strength in [0, 1]: the sigmoid of the ranking head "
                                        "(the rating head, or the interaction head when the model has one)")
    user_weight: float = Field(description="attention on the user side; the two weights sum to 1")
    movie_weight: float = Field(description="attention on the movie side")


class Item(Movie, Scored):
    pass


class RecommendationsOut(BaseModel):
    user_id: int
    cold_start: bool = Field(description="a user with no rating the service knows of: the most rated movies at their "
                                         "mean rating, user_weight 0, movie_weight 1")
    model_version: str
    variant: Literal["champion", "challenger"] = Field(
        description="the side of the online experiment that answered (GET /experiment); champion when none runs")
    rec_id: str = Field(description="names this answer: the model version, the user and the state of their ratings it "
                                    "was computed from, and k; post it with a rating of one of its movies")
    items: list[Item]


Source = Literal["dataset", "live"]


class OwnRating(Movie):
    rating: float = Field(description="the user's own rating")
    source: Source = Field(description="dataset: a rating the model was trained with; live: one posted to /ratings")


class BecauseYouRated(OwnRating):
    similarity: float = Field(description="cosine similarity of the two movies' representations")


class RetrievedBecause(OwnRating):
    weight: float = Field(description="this rating's share of the movie's retrieval score (EASE, item-kNN: the "
                                      "exact term; ALS: the cosine of the two movies' factors; history: its "
                                      "attention weight times its embedding's part of the score)")


class RatedNextAfter(OwnRating):
    weight: float = Field(description="this rating's term of the movie's sequence score: its recency weight times "
                                      "how often the movie came next after it in other users' histories")


class HistoryAttention(OwnRating):
    weight: float = Field(description="how much the model's attention on this rating raised the movie's ranking "
                                      "logit: its attention weight times its value's part of the logit, linearised "
                                      "at the user's vector (model.architecture history)")


class ExplanationOut(Movie, Scored):
    user_id: int
    model_version: str
    because_you_rated: list[BecauseYouRated]
    shared_genres: list[str] = Field(description="genres of this movie among those the user's liked movies have, "
                                                 "most shared first")
    retriever: str | None = Field(description="the candidate retriever (ease, als, itemknn, history), or null when "
                                              "the model ranks the whole catalogue itself")
    retrieved_because_you_rated: list[RetrievedBecause] = Field(
        description="the user's ratings that made the retriever propose this movie, strongest first")
    rated_next_after: list[RatedNextAfter] = Field(
        description="the user's latest ratings that other users often followed with this movie (the sequence "
                    "signal blended into the retriever's scores), strongest first; empty without it")
    history_attention: list[HistoryAttention] = Field(
        description="the user's latest ratings the history-aware NCF's attention leaned on for this movie, "
                    "strongest first; empty for a model whose user side reads no history")


Id = Annotated[int, Field(ge=0, le=MAX_ID)]


class Pair(BaseModel):
    user_id: Id
    movie_id: Id


class PredictIn(BaseModel):
    pairs: list[Pair] = Field(max_length=MAX_PAIRS)


class PairPrediction(Scored):
    user_id: int
    movie_id: int


class PredictionsOut(BaseModel):
    model_version: str
    predictions: list[PairPrediction]


class Rated(Movie):
    rating: float
    timestamp: int
    source: Source = Field(description="dataset: a rating the model was trained with; live: one posted to /ratings")


class HistoryOut(BaseModel):
    user_id: int
    ratings: list[Rated] = Field(description="most recent first; a movie rated again appears once per rating")


Text = Annotated[str, Field(min_length=1, max_length=MAX_TEXT)]


def not_a_boolean(value: object) -> object:
    """JSON's true and false are no numbers (pydantic would read them as 1 and 0)."""
    if isinstance(value, bool):
        raise ValueError("a boolean is not a number")
    return value


NumberId = Annotated[Id, BeforeValidator(not_a_boolean)]


class RatingIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    event_id: Text = Field(description="the client's id of this event: posting it again changes nothing (safe retries)")
    user_id: NumberId
    movie_id: NumberId
    rating: Annotated[float, BeforeValidator(not_a_boolean)] = Field(
        description="on the dataset's scale and step (MovieLens: 0.5 to 5.0 in half stars)")
    timestamp: Annotated[int, Field(ge=0, le=MAX_ID), BeforeValidator(not_a_boolean)] | None = Field(
        default=None, description="when the user rated (unix seconds); default: when the service receives it")
    rec_id: Text | None = Field(default=None, description="the rec_id of the /recommend answer the movie was in")


class RatingsIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ratings: list[RatingIn] = Field(min_length=1, max_length=MAX_RATINGS)


class RatingResult(BaseModel):
    event_id: str
    status: Literal["stored", "duplicate", "rejected"] = Field(
        description="stored: committed now; duplicate: this event_id was stored before (nothing changed); "
                    "rejected: not stored, see reason")
    reason: str | None = Field(description="why a rating was rejected; null otherwise")


class RatingsOut(BaseModel):
    results: list[RatingResult] = Field(description="one per posted rating, in order; sent after the stored ones "
                                                    "are committed")


class NewUserIn(BaseModel):
    model_config = ConfigDict(extra="forbid")


class NewUserOut(BaseModel):
    user_id: int = Field(description="a new id, above every id of the dataset, never given out again")


class OnboardingOut(BaseModel):
    user_id: int | None
    items: list[Movie] = Field(description="movies to ask the user to rate: popular ones, spread across genres, "
                                           "none they rated")


class UserSummary(BaseModel):
    user_id: int
    n_ratings: int


class UsersOut(BaseModel):
    count: int = Field(description="known users in all")
    users: list[UserSummary]


class SearchOut(BaseModel):
    query: str
    movies: list[Movie] = Field(description="titles containing the query, most rated first")


class VersionOut(BaseModel):
    model_name: str
    model_version: str
    run_id: str
    model_uri: str
    loaded_at: str


class HealthOut(BaseModel):
    status: str
    model_version: str
    cached_users: int
    cached_answers: int


class IntervalOut(BaseModel):
    estimate: float
    low: float = Field(description="lower end of the 95% interval")
    high: float = Field(description="upper end of the 95% interval")


class VariantOut(BaseModel):
    variant: Literal["champion", "challenger"]
    model_version: str
    lists_served: int = Field(description="distinct lists (rec_ids) served, or computed in shadow")
    ratings_attributed: int = Field(description="ratings posted with a list's rec_id, by its user, of a movie it "
                                                "showed, within window_s of it being served")
    rated_lists: int
    positive_lists: int = Field(description="lists with an attributed rating >= positive_rating")
    rated_list_rate: IntervalOut = Field(description="share of lists with an attributed rating (Wilson)")
    positive_share: IntervalOut = Field(description="share of attributed ratings >= positive_rating (Wilson)")
    mean_rating: IntervalOut | None = Field(description="mean attributed rating; null without any")
    movies_shown: int = Field(description="distinct movies in the lists")
    catalogue_coverage: float | None = Field(description="movies_shown of the catalogue's movies")
    positive_rate: IntervalOut = Field(description="share of lists with an attributed rating >= positive_rating "
                                                   "(Wilson): what promotion compares")


class ExperimentOut(BaseModel):
    running: bool = Field(description="whether an experiment runs: the model's challenger alias names another "
                                      "version than its champion")
    experiment_id: str | None = Field(description="<champion version>-vs-<challenger version>")
    mode: Literal["split", "shadow"]
    share: float = Field(description="of users the challenger answers (split mode)")
    margin: float
    min_lists: int
    auto_promote: bool
    champion: VariantOut | None
    challenger: VariantOut | None
    positive_rate_difference: IntervalOut | None = Field(
        description="challenger - champion positive rate, Newcombe 95% interval")
    positive_rate_difference_lower: float | None = Field(
        description="its one-sided 95% lower bound: promotion needs it >= -margin (and the offline gate passed)")


class ErrorOut(BaseModel):
    error: str
