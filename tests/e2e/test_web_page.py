"""The web page in a real headless Chromium (Debian's, driven by Playwright): pick user 1, see their
history and recommendations, open an explanation. Nothing may be fetched from outside the app."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from playwright.sync_api import expect, sync_playwright

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]

pytestmark = pytest.mark.e2e


@pytest.fixture
def problems() -> list[str]:
    """What went wrong in the page: script errors, console errors, requests leaving the app."""
    return []


@pytest.fixture
def page(served_url: str, problems: list[str]):
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing: apt-get install -y chromium (.ci/run installs it)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.set_default_timeout(30_000)
            page.on("request", lambda r: None if r.url.startswith((served_url, "data:")) else problems.append(
                f"request outside the app: {r.url}"))
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.on("console", lambda m: problems.append(f"console: {m.text}") if m.type == "error" else None)
            yield page
        finally:
            browser.close()


def test_pick_user_1_then_see_recommendations_and_an_explanation(page, problems: list[str], served_url: str):
    expected = httpx.get(f"{served_url}/recommend", params={"user_id": 1, "k": 10}, timeout=30).json()["items"]
    page.goto(f"{served_url}/")
    expect(page.locator("#user-count")).to_contain_text("610 known users")

    page.fill("#user-id", "1")
    page.click("#show-user")
    recommendations = page.locator("#recommendations li[data-movie-id]")
    expect(recommendations).to_have_count(10)
    assert recommendations.locator(".title").all_inner_texts() == [item["title"] for item in expected]
    assert page.locator("#recommendations .bar > span").count() == 10  # strength bars
    history = httpx.get(f"{served_url}/users/1/history", timeout=30).json()["ratings"]
    expect(page.locator("#history tr")).to_have_count(len(history))
    expect(page.locator("#history tr").first).to_contain_text(history[0]["title"])
    expect(page.locator("#cold-start")).to_be_hidden()

    recommendations.first.click()
    explanation = page.locator("#explanation")
    expect(explanation.locator("h3.title")).to_have_text(expected[0]["title"])
    expect(page.locator("#because-you-rated li").first).to_be_visible()
    # The retriever's evidence: the user's own ratings behind the top recommendation's retrieval score.
    explained = httpx.get(f"{served_url}/explain", params={"user_id": 1, "movie_id": expected[0]["movie_id"]},
                          timeout=30).json()
    evidence, rated_next = explained["retrieved_because_you_rated"], explained["rated_next_after"]
    assert evidence, "the served model's retriever gives no evidence for its own top recommendation"
    expect(page.locator("#retrieved-because li")).to_have_count(len(evidence))
    expect(page.locator("#retrieved-because li").first).to_contain_text(evidence[0]["title"])
    # The sequence signal's evidence: the user's latest ratings that others followed with this movie.
    assert rated_next, "the served model's sequence signal gives no evidence for its own top recommendation"
    expect(page.locator("#rated-next-after li")).to_have_count(len(rated_next))
    expect(page.locator("#rated-next-after li").first).to_contain_text(rated_next[0]["title"])
    user_weight = float(page.locator("#user-weight").inner_text().split()[-1])
    movie_weight = float(page.locator("#movie-weight").inner_text().split()[-1])
    assert user_weight + movie_weight == pytest.approx(1, abs=0.011)
    assert user_weight == pytest.approx(expected[0]["user_weight"], abs=0.006)

    page.fill("#movie-search", "toy story")
    page.press("#movie-search", "Enter")
    page.locator("#search-results li", has_text="Toy Story (1995)").click()
    expect(explanation.locator("h3.title")).to_have_text("Toy Story (1995)")

    assert problems == []


def test_unknown_user_sees_cold_start_recommendations(page, problems: list[str], served_url: str):
    page.goto(f"{served_url}/")
    page.fill("#user-id", "999999")
    page.press("#user-id", "Enter")
    expect(page.locator("#cold-start")).to_be_visible()
    expect(page.locator("#recommendations li[data-movie-id]")).to_have_count(10)
    expect(page.locator("#history")).to_contain_text("no rating history")
    assert problems == []
