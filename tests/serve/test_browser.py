"""The web page in a real browser: Debian's chromium driven by playwright against the real app on a loopback port,
serving a tiny index, CLIP and DALL·E. What a user does: search, click a result, drop an image, zero-shot, generate,
draw a box and inpaint, unlock a server that wants an API key."""

import os
import re
from pathlib import Path

import pytest
from helpers import serving

CHROMIUM = "/usr/bin/chromium"
API_KEY = "browser-test-key"
WAIT_MS = 20_000  # a request on a busy 2-core CI machine; the tiny models answer in about a second
ALL_IMAGES_LOADED = """selector => {
    const images = [...document.querySelectorAll(selector)];
    return images.length > 0 && images.every(image => image.complete && image.naturalWidth > 0);
}"""


def browser_missing(reason: str):
    """Skips on a developer machine without the browser; fails under CI, where `.ci/run` installs it."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI must run the browser test: .ci/run installs chromium with apt-get)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        browser_missing(f"{CHROMIUM} is missing: install Debian's chromium (apt-get install -y chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        browser_missing("the playwright package is missing: pip install -e '.[test]'")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, args=["--headless", "--no-sandbox", "--disable-gpu"]
        )
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def served(browser, built_index, tiny_clip_run, tiny_runs):
    from clipdalle.serve import create_app, load_models

    models = load_models(index=built_index, clip=tiny_clip_run, dalle=tiny_runs[1])
    with serving(create_app(models)) as url:
        yield url
    models.close()


@pytest.fixture(scope="module")
def served_locked(browser, built_index):
    """A second server: search only (no DALL·E), behind an API key."""
    from clipdalle.serve import ServeSettings, create_app, load_models

    models = load_models(index=built_index)
    with serving(create_app(models, ServeSettings(api_key=API_KEY))) as url:
        yield url
    models.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 1600})
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    script_errors = []
    page.on("pageerror", lambda error: script_errors.append(str(error)))
    yield page
    context.close()
    assert script_errors == [], f"the page raised JavaScript errors: {script_errors}"


def open_page(page, url: str) -> dict:
    """Loads the page, waits until it has read /api/info, and returns that info."""
    from playwright.sync_api import expect

    page.goto(url)
    expect(page.locator("#status .chip")).to_have_count(3, timeout=WAIT_MS)
    return page.request.get(f"{url}/api/info").json()


def wait_until_answered(page, panel: str):
    """Waits for the panel's request to finish: the results region drops aria-busy and the spinner hides."""
    from playwright.sync_api import expect

    expect(page.locator(f"#{panel}-results")).not_to_have_attribute("aria-busy", "true", timeout=WAIT_MS)
    expect(page.locator(f"#{panel}-busy")).to_be_hidden(timeout=WAIT_MS)


def shown_results(page) -> list[dict]:
    cards = page.locator("#search-results button.card")
    return [
        {"id": int(card.get_attribute("data-id")), "score": float(card.locator(".score").inner_text())}
        for card in cards.all()
    ]


def test_search_by_text_then_click_a_result_for_similar_ones(page, served):
    from playwright.sync_api import expect

    info = open_page(page, served)
    expect(page.locator("#status")).to_contain_text(f"{info['images']} images")
    page.get_by_role("searchbox").fill("a red circle")
    page.get_by_role("button", name="Search", exact=True).click()
    wait_until_answered(page, "search")
    expect(page.locator("#search-query")).to_contain_text("a red circle")
    page.wait_for_function(ALL_IMAGES_LOADED, arg="#search-results img")
    answer = page.request.get(f"{served}/api/search", params={"q": "a red circle", "k": 24}).json()
    shown = shown_results(page)
    assert [item["id"] for item in shown] == [item["id"] for item in answer["results"]]
    scores = [item["score"] for item in shown]
    assert len(scores) > 0 and scores == sorted(scores, reverse=True)

    clicked = shown[-1]["id"]
    page.locator("#search-results button.card").last.click()
    wait_until_answered(page, "search")
    expect(page.locator("#search-query")).to_contain_text("Images like")
    page.wait_for_function(ALL_IMAGES_LOADED, arg="#search-results img")
    similar = shown_results(page)
    assert similar[0]["id"] == clicked and similar[0]["score"] > 0.99  # the image itself comes first


def test_upload_an_image_to_find_it_in_the_collection(page, served, shapes_32):
    from playwright.sync_api import expect

    open_page(page, served)
    page.set_input_files("#similar-file", str(shapes_32 / "square_blue_1.png"))
    wait_until_answered(page, "search")
    expect(page.locator("#search-query")).to_contain_text("square_blue_1.png")
    page.wait_for_function(ALL_IMAGES_LOADED, arg="#search-results img")
    first = page.locator("#search-results button.card").first
    expect(first.locator(".caption")).to_have_text("a blue square")
    assert shown_results(page)[0]["score"] > 0.99


def test_zero_shot_shows_a_bar_per_label_and_server_errors_inline(page, served, shapes_32):
    from playwright.sync_api import expect

    open_page(page, served)
    page.get_by_role("tab", name="Zero-shot").click()
    page.set_input_files("#classify-file", str(shapes_32 / "circle_red_0.png"))
    expect(page.locator("#classify-preview")).to_be_visible()
    page.get_by_label("Labels").fill("circle\nsquare\ntriangle\ncross")
    page.get_by_role("button", name="Classify").click()
    wait_until_answered(page, "classify")
    rows = page.locator("#classify-results li")
    expect(rows).to_have_count(4)
    labels = rows.locator(".bar-label").all_inner_texts()
    percents = [float(text.rstrip(" %")) for text in rows.locator(".bar-value").all_inner_texts()]
    widths = [box["width"] for box in (fill.bounding_box() for fill in rows.locator(".bar-fill").all())]
    assert sorted(labels) == ["circle", "cross", "square", "triangle"]
    assert abs(sum(percents) - 100) < 0.5 and percents == sorted(percents, reverse=True)
    assert widths == sorted(widths, reverse=True) and widths[0] > widths[-1]

    page.get_by_label("Labels").fill("circle")  # one label: the server refuses, the page shows its message
    page.get_by_role("button", name="Classify").click()
    wait_until_answered(page, "classify")
    upload = {"name": "c.png", "mimeType": "image/png", "buffer": (shapes_32 / "circle_red_0.png").read_bytes()}
    form = {"image": upload, "labels": "circle", "template": "a {}"}
    detail = page.request.post(f"{served}/api/classify", multipart=form).json()["detail"]
    expect(page.locator("#classify-error")).to_be_visible()
    expect(page.locator("#classify-error")).to_have_text(detail)
    expect(rows).to_have_count(0)


def test_generate_shows_the_reranked_images(page, served):
    from playwright.sync_api import expect

    info = open_page(page, served)
    page.get_by_role("tab", name="Generate").click()
    panel = page.get_by_role("tabpanel")
    expect(panel.locator(".notice")).to_be_hidden()
    panel.get_by_label("Prompt", exact=True).fill("a blue square")
    panel.get_by_label("Candidates", exact=True).fill("3")
    panel.get_by_label("Keep best", exact=True).fill("2")
    panel.get_by_role("button", name="Generate").click()
    wait_until_answered(page, "generate")
    expect(page.locator("#generate-error")).to_be_hidden()
    images = page.locator("#generate-results img")
    expect(images).to_have_count(2)
    page.wait_for_function(ALL_IMAGES_LOADED, arg="#generate-results img")
    assert images.evaluate_all("list => list.map(image => image.naturalWidth)") == [info["image_size"]] * 2
    scores = [float(text.split()[-1]) for text in page.locator("#generate-results .score").all_inner_texts()]
    assert scores == sorted(scores, reverse=True)  # reranked by CLIP, best first
    expect(page.locator("#generate-notice")).to_be_hidden()  # "a blue square" is a training caption


def test_generate_suggests_known_prompts_and_says_when_a_prompt_is_unseen(page, served):
    from playwright.sync_api import expect

    open_page(page, served)
    page.get_by_role("tab", name="Generate").click()
    prompt = page.get_by_role("tabpanel").get_by_label("Prompt", exact=True)
    prompt.fill("a red c")
    options = page.locator("#generate-suggestions option")
    expect(options.first).to_have_attribute("value", "a red cross", timeout=WAIT_MS)  # the DALL·E's own captions
    values = options.evaluate_all("list => list.map(option => option.value)")
    assert {"a red circle", "a red cross"} <= set(values) and all(value.startswith("a red c") for value in values)
    prompt.fill("a purple hexagon")
    page.get_by_role("tabpanel").get_by_label("Candidates", exact=True).fill("1")
    page.get_by_role("tabpanel").get_by_label("Keep best", exact=True).fill("1")
    page.get_by_role("tabpanel").get_by_role("button", name="Generate").click()
    wait_until_answered(page, "generate")
    notice = page.locator("#generate-notice")
    expect(notice).to_be_visible()
    expect(notice).to_have_text("not in this model's training set: purple, hexagon; expect a guess")
    expect(page.locator("#generate-results img")).to_have_count(1)  # it still draws its guess


def test_edit_draws_a_box_with_the_mouse_and_shows_candidates(page, served, shapes_32):
    from playwright.sync_api import expect

    open_page(page, served)
    page.get_by_role("tab", name="Edit").click()
    page.set_input_files("#edit-file", str(shapes_32 / "circle_red_0.png"))  # 32 x 32 pixels
    canvas = page.locator("#edit-canvas")
    expect(canvas).to_be_visible()
    box = canvas.bounding_box()

    def at(pixel_x: float, pixel_y: float) -> tuple[float, float]:  # screen point of an image position
        return box["x"] + box["width"] * pixel_x / 32, box["y"] + box["height"] * pixel_y / 32

    page.mouse.move(*at(4.7, 8.7))
    page.mouse.down()
    page.mouse.move(*at(20.3, 27.3), steps=4)
    page.mouse.up()
    panel = page.get_by_role("tabpanel")
    expect(panel.get_by_role("textbox", name="Area to regenerate")).to_have_value("4,8,21,28")  # end exclusive
    panel.get_by_label("Prompt", exact=True).fill("a green square")
    panel.get_by_label("Candidates", exact=True).fill("2")
    panel.get_by_label("Keep best", exact=True).fill("1")
    panel.get_by_role("button", name="Fill the box").click()
    wait_until_answered(page, "edit")
    expect(page.locator("#edit-error")).to_be_hidden()
    expect(page.locator("#edit-results img")).to_have_count(1)
    page.wait_for_function(ALL_IMAGES_LOADED, arg="#edit-results img")


def test_api_key_unlocks_the_page_and_generation_is_explained_when_off(page, served_locked):
    from playwright.sync_api import expect

    page.goto(served_locked)
    key = page.get_by_label("API key")
    expect(key).to_be_visible()
    key.fill("wrong")
    page.get_by_role("button", name="Unlock").click()
    expect(page.locator("#auth-message")).to_contain_text("not accepted")
    key.fill(API_KEY)
    page.get_by_role("button", name="Unlock").click()
    expect(page.locator("#status .chip")).to_have_count(3)
    expect(key).to_be_hidden()

    page.get_by_role("searchbox").fill("a black cross")
    page.get_by_role("searchbox").press("Enter")
    wait_until_answered(page, "search")
    page.wait_for_function(ALL_IMAGES_LOADED, arg="#search-results img")  # thumbnails carry the key too

    page.get_by_role("tab", name="Generate").click()
    panel = page.get_by_role("tabpanel")
    expect(panel.locator(".notice")).to_be_visible()
    expect(panel.locator(".notice")).to_contain_text("--dalle")
    expect(panel.get_by_role("button", name="Generate")).to_be_disabled()

    page.reload()  # the key is remembered for the tab's session
    expect(page.locator("#status .chip")).to_have_count(3)
    expect(key).to_be_hidden()


def test_heat_map_toggle_overlays_each_result_with_its_map_for_the_query(page, served):
    from playwright.sync_api import expect

    open_page(page, served)
    page.get_by_role("searchbox").fill("a red circle")
    page.get_by_role("button", name="Search", exact=True).click()
    wait_until_answered(page, "search")
    cards = page.locator("#search-results button.card")
    expect(cards.first).to_be_visible()
    count = cards.count()
    page.get_by_label("Show where each result matches").check()
    overlays = page.locator("#search-results .heat-overlay")
    expect(overlays).to_have_count(count)
    page.wait_for_function(ALL_IMAGES_LOADED, arg="#search-results .heat-overlay")
    first_id = cards.first.get_attribute("data-id")
    expected = page.request.get(f"{served}/api/explain/{first_id}", params={"q": "a red circle"}).json()
    assert overlays.first.get_attribute("src") == expected["overlay"]  # the map of that image for that query
    expect(overlays.first).to_have_attribute("alt", re.compile("a red circle"))
    page.get_by_label("Show where each result matches").uncheck()
    expect(overlays).to_have_count(0)

    page.get_by_role("button", name=f"Subtract image #{first_id} from the query").click()  # a combined query
    wait_until_answered(page, "search")
    expect(page.get_by_role("searchbox")).to_have_value(f"a red circle - #{first_id}")
    combined = page.request.get(f"{served}/api/query", params={"q": f"a red circle - #{first_id}", "k": 24}).json()
    assert [item["id"] for item in shown_results(page)] == [item["id"] for item in combined["results"]]


def test_duplicates_tab_shows_the_groups_the_api_finds(page, served):
    from playwright.sync_api import expect

    open_page(page, served)
    page.get_by_role("tab", name="Duplicates").click()
    for method, threshold, rule in [("clip", "0.99", "cosine above 0.99"), ("pixels", "-1", "checked on the pixels")]:
        page.get_by_label("Method").select_option(method)
        page.get_by_label("Cosine threshold").fill(threshold)
        page.get_by_role("button", name="Find duplicates").click()
        wait_until_answered(page, "duplicates")
        params = {"threshold": threshold, "max_groups": 50, "method": method}
        answer = page.request.get(f"{served}/api/duplicates", params=params).json()
        assert answer["groups"], "the shapes have near-identical jittered copies"
        groups = page.locator("#duplicates-results > li")
        expect(groups).to_have_count(len(answer["groups"]))
        expect(page.locator("#duplicates-summary")).to_contain_text(f"{answer['groups_total']} group")
        expect(page.locator("#duplicates-summary")).to_contain_text(rule)
        shown = groups.first.locator(".member .muted").all_inner_texts()
        assert shown == [f"#{image_id}" for image_id in answer["groups"][0]["ids"]]
        page.wait_for_function(ALL_IMAGES_LOADED, arg="#duplicates-results img")
    expect(page.locator("#duplicates-results .group-title").first).to_contain_text("pixel difference")


def test_describe_tab_captions_an_upload_and_shows_where_a_text_matches(page, served, shapes_32):
    from playwright.sync_api import expect

    open_page(page, served)
    page.get_by_role("tab", name="Describe").click()
    page.set_input_files("#describe-file", str(shapes_32 / "circle_red_0.png"))
    expect(page.locator("#describe-preview")).to_be_visible()
    page.get_by_role("textbox", name=re.compile("^Terms")).fill(
        "template: a {colour} {shape}\n[colour]\nred\nblue\n[shape]\ncircle\nsquare"
    )
    page.get_by_role("button", name="Caption").click()
    wait_until_answered(page, "describe")
    upload = {"name": "c.png", "mimeType": "image/png", "buffer": (shapes_32 / "circle_red_0.png").read_bytes()}
    labels = "template: a {colour} {shape}\n[colour]\nred\nblue\n[shape]\ncircle\nsquare"
    expected = page.request.post(f"{served}/api/caption", multipart={"image": upload, "labels": labels}).json()
    expect(page.locator(".caption-text")).to_have_text(expected["caption"])
    page.get_by_label("Where is…").fill("a red circle")
    page.get_by_role("button", name="Show", exact=True).click()
    wait_until_answered(page, "describe")
    page.wait_for_function(ALL_IMAGES_LOADED, arg="#describe-results img")
    expect(page.locator("#describe-results img")).to_have_attribute("alt", re.compile("a red circle"))
