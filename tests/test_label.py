"""``diffpo label``: the labelling server's API on a fake round (no model), the page in a real
headless Chromium, and the command's help and errors. The browser test is skipped only where
chromium, chromedriver or selenium is missing AND DIFFPO_REQUIRE_BROWSER is unset."""

from __future__ import annotations

import http.client
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
from conftest import label_server_thread

from diffpo.data.rounds import LABELS, read_labels, round_dir, write_manifest
from diffpo.labeling.server import choose_round, make_server

SAMPLES = 3
FIRST_PAIRS = [(0, 0, 1), (0, 0, 2), (0, 1, 2), (1, 0, 1)]


def write_round(run_dir, index: int, groups: int = 2, seed: int = 0):
    """A complete sampling round as the online trainer writes it, drawn from the shapes world."""
    from diffpo.data.shapes import sample_shapes

    folder = round_dir(run_dir, index)
    (folder / "images").mkdir(parents=True)
    shapes = sample_shapes(groups * SAMPLES, size=32, seed=seed)
    images = []
    for group in range(groups):
        names = [f"images/g{group:04d}-s{sample}.png" for sample in range(SAMPLES)]
        for sample, name in enumerate(names):
            shapes[group * SAMPLES + sample][0].save(folder / name)
        images.append(names)
    prompts = [shapes[group * SAMPLES][1] for group in range(groups)]
    return write_manifest(folder, index, prompts, samples_per_prompt=SAMPLES, images=images)


@pytest.fixture
def run_dir(tmp_path):
    write_round(tmp_path, 0)
    return tmp_path


@pytest.fixture
def server(run_dir):
    with label_server_thread(run_dir) as server:
        yield server


def get(server, path):
    with urllib.request.urlopen(server.url.rstrip("/") + path, timeout=10) as response:
        return response.status, response.headers.get_content_type(), response.read()


def get_json(server, path):
    return json.loads(get(server, path)[2])


def post(server, body, content_type="application/json"):
    """(status, JSON answer) of POST /api/label; 4xx answers are returned, not raised."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(server.url + "api/label", data=data, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def raw_status(server, path):
    """The status of GET ``path`` sent byte for byte (urllib would not send every odd path as is)."""
    host, port = server.server_address[:2]
    connection = http.client.HTTPConnection(host, port, timeout=10)
    try:
        connection.putrequest("GET", path, skip_accept_encoding=True)
        connection.endheaders()
        return connection.getresponse().status
    finally:
        connection.close()


def label(server, pair, choice):
    group, a, b = pair
    return post(server, {"group": group, "a": a, "b": b, "choice": choice})


def label_lines(run_dir, index=0):
    path = round_dir(run_dir, index) / LABELS
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


# --------------------------------------------------------------------------------------------
# API
# --------------------------------------------------------------------------------------------


def test_next_pair_is_the_first_pair_of_the_manifest_with_its_prompt_and_images(server, run_dir):
    manifest = server.session.manifest
    data = get_json(server, "/api/next")
    assert data == {"done": False, "round": 0, "labelled": 0, "total": 6, "group": 0, "a": 0, "b": 1,
                    "prompt": manifest.prompts[0], "image_a": "/image/0/0", "image_b": "/image/0/1"}
    status, content_type, body = get(server, data["image_b"])
    assert status == 200 and content_type == "image/png"
    assert body == manifest.image_path(0, 1).read_bytes()
    status, content_type, page = get(server, "/")
    assert status == 200 and content_type == "text/html"
    for element in ('id="choose-a"', 'id="choose-b"', 'id="choose-tie"', 'id="progress"', 'id="done"'):
        assert element.encode() in page


def test_a_label_is_appended_at_once_and_the_answer_is_the_next_pair(server, run_dir):
    status, data = label(server, FIRST_PAIRS[0], "b")
    assert status == 200
    assert (data["group"], data["a"], data["b"], data["labelled"], data["total"]) == (0, 0, 2, 1, 6)
    [line] = label_lines(run_dir)
    assert set(line) == {"group", "a", "b", "choice", "time"}
    assert (line["group"], line["a"], line["b"], line["choice"]) == (0, 0, 1, "b")
    assert get_json(server, "/api/next")["b"] == 2


@pytest.mark.parametrize("body", [
    {"group": 0, "a": 0, "b": 1, "choice": "left"},      # not a choice
    {"group": 0, "a": 0, "b": 1},                         # no choice
    {"group": 5, "a": 0, "b": 1, "choice": "a"},          # no such group
    {"group": 0, "a": 1, "b": 0, "choice": "a"},          # pairs are stored a < b
    {"group": 0, "a": 0, "b": 3, "choice": "a"},          # no such sample
    {"group": 0, "a": True, "b": 1, "choice": "a"},       # a bool is not an index
    {"group": "0", "a": 0, "b": 1, "choice": "a"},
    {"round": 1, "group": 0, "a": 0, "b": 1, "choice": "a"},  # a page left open on another round
    [0, 0, 1, "a"],
    b"not json",
])
def test_a_bad_label_is_400_with_an_error_and_writes_nothing(server, run_dir, body):
    status, data = post(server, body)
    assert status == 400 and data["error"]
    assert not (round_dir(run_dir, 0) / LABELS).exists()
    assert get_json(server, "/api/next")["labelled"] == 0  # the server still answers


def test_a_label_without_a_json_content_type_is_refused(server, run_dir):
    status, data = post(server, {"group": 0, "a": 0, "b": 1, "choice": "a"}, content_type="text/plain")
    assert status == 400 and "application/json" in data["error"]
    assert not (round_dir(run_dir, 0) / LABELS).exists()


@pytest.mark.parametrize("path", [
    "/image/../round.json", "/image/0/../../round.json", "/image/%2e%2e/round.json", "/image/0/0/../../../round.json",
    "/image/0/%2e%2e%2fround.json", "/image//etc/passwd", "/image/2/0", "/image/0/3", "/image/0/-1", "/image/0",
    "/round.json", "/images/g0000-s0.png", "/../round.json",
])
def test_only_manifest_images_are_served(server, path):
    assert raw_status(server, path) == 404


def test_a_restarted_server_skips_the_labelled_pairs(run_dir):
    with label_server_thread(run_dir) as server:
        label(server, FIRST_PAIRS[0], "a")
        label(server, FIRST_PAIRS[1], "b")
    with label_server_thread(run_dir) as server:
        data = get_json(server, "/api/next")
    assert (data["group"], data["a"], data["b"], data["labelled"]) == (0, 1, 2, 2)


def test_after_the_last_pair_the_answer_is_done_with_the_resume_command(server, run_dir):
    pairs = server.session.manifest.pairs
    for pair in pairs[:-1]:
        assert label(server, pair, "a")[1]["done"] is False
    status, data = label(server, pairs[-1], "tie")
    assert status == 200 and data["done"] is True and (data["labelled"], data["total"]) == (6, 6)
    assert data["resume_command"] == f"diffpo train {run_dir / 'config.yaml'} resume_from=latest"
    assert get_json(server, "/api/next")["done"] is True
    labels = read_labels(round_dir(run_dir, 0))
    assert labels[pairs[-1]] == "tie" and list(labels.values()).count("a") == 5


def test_a_later_label_of_the_same_pair_wins(server, run_dir):
    label(server, FIRST_PAIRS[0], "a")
    assert label(server, FIRST_PAIRS[0], "tie")[0] == 200  # a second tab may relabel; the last line wins
    assert len(label_lines(run_dir)) == 2 and read_labels(round_dir(run_dir, 0)) == {FIRST_PAIRS[0]: "tie"}


# --------------------------------------------------------------------------------------------
# Which round
# --------------------------------------------------------------------------------------------


def test_the_default_round_is_the_latest_with_pending_pairs(run_dir):
    from diffpo.data.rounds import append_label

    write_round(run_dir, 1, seed=1)
    assert choose_round(run_dir).index == 1
    for pair in choose_round(run_dir).pairs:
        append_label(round_dir(run_dir, 1), *pair, "a")
    assert choose_round(run_dir).index == 0  # round 1 is done, round 0 is not
    for pair in choose_round(run_dir).pairs:
        append_label(round_dir(run_dir, 0), *pair, "b")
    assert choose_round(run_dir).index == 1  # all done: the latest
    assert choose_round(run_dir, 0).index == 0


def test_a_missing_round_or_run_is_an_error_naming_the_fix(run_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"round 7 does not exist .*--round with one of 0"):
        choose_round(run_dir, 7)
    with pytest.raises(FileNotFoundError, match="has no sampling rounds"):
        choose_round(tmp_path / "rounds")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        choose_round(tmp_path / "missing")


def test_a_port_in_use_is_an_error_naming_the_fix(server, run_dir):
    with pytest.raises(OSError, match="--port"):
        make_server(run_dir, port=server.server_address[1])


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------


def test_label_help_exits_0(capsys):
    from diffpo.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["label", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "usage: diffpo label" in out and "--round" in out and "labels.jsonl" in out


def test_label_of_a_run_without_rounds_is_a_one_line_error(tmp_path, capsys):
    from diffpo.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["label", str(tmp_path)])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and str(tmp_path) in lines[0] and "no sampling rounds" in lines[0]
    assert "Traceback" not in lines[0]


def test_the_command_prints_the_url_and_stops_cleanly_on_ctrl_c(run_dir):
    process = subprocess.Popen([sys.executable, "-m", "diffpo", "label", str(run_dir), "--port", "0"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = process.stdout.readline()
        assert first.startswith(f"labelling round 0 of {run_dir}: http://127.0.0.1:"), first + process.stderr.read()
        assert "(Ctrl-C to stop; every click is saved)" in first
        url = first.split(": ", 1)[1].split(" ", 1)[0]
        with urllib.request.urlopen(url + "api/next", timeout=10) as response:
            assert json.loads(response.read())["total"] == 6
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=20)
    finally:
        process.kill()
    assert process.returncode == 0, err
    assert "0 of 6 pairs labelled" in out and "Traceback" not in err
    assert sorted(p.name for p in round_dir(run_dir, 0).iterdir()) == ["images", "round.json"]  # wrote nothing


# --------------------------------------------------------------------------------------------
# The page in a real browser
# --------------------------------------------------------------------------------------------


def browser_requirements() -> str | None:
    """What is missing for the browser test, or None."""
    missing = [name for name in ("chromium", "chromedriver") if shutil.which(name) is None]
    if importlib.util.find_spec("selenium") is None:
        missing.append("selenium (pip install -e '.[test]')")
    return ", ".join(missing) or None


@pytest.fixture
def driver():
    missing = browser_requirements()
    if missing:
        if os.environ.get("DIFFPO_REQUIRE_BROWSER"):
            pytest.fail(f"DIFFPO_REQUIRE_BROWSER is set but {missing} is missing: apt-get install -y chromium chromium-driver")
        pytest.skip(f"{missing} is missing (apt-get install -y chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1200,900", "--no-first-run", "--disable-background-networking"):
        options.add_argument(argument)
    browser = webdriver.Chrome(options=options, service=Service(executable_path=shutil.which("chromedriver")))
    browser.set_page_load_timeout(30)
    try:
        yield browser
    finally:
        browser.quit()


def test_a_click_and_a_key_on_the_page_record_labels(driver, server, run_dir):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(driver, 20)
    progress = lambda: driver.find_element(By.ID, "progress").text  # noqa: E731
    images_shown = ("return ['image-a', 'image-b'].every(id => { const i = document.getElementById(id); "
                    "return i.complete && i.naturalWidth === 32; })")

    driver.get(server.url)
    wait.until(lambda d: d.find_element(By.ID, "choose-b").is_enabled() and d.execute_script(images_shown))
    assert progress() == "0 of 6 pairs labelled"
    assert driver.find_element(By.ID, "prompt").text == server.session.manifest.prompts[0]
    assert driver.find_element(By.ID, "image-a").get_attribute("src").endswith("/image/0/0")

    driver.find_element(By.ID, "choose-b").click()
    wait.until(lambda d: progress() == "1 of 6 pairs labelled" and d.find_element(By.ID, "choose-tie").is_enabled())
    [line] = label_lines(run_dir)
    assert (line["group"], line["a"], line["b"], line["choice"]) == (0, 0, 1, "b")
    assert driver.find_element(By.ID, "image-b").get_attribute("src").endswith("/image/0/2")

    driver.find_element(By.TAG_NAME, "body").send_keys(Keys.ARROW_DOWN)
    wait.until(lambda d: progress() == "2 of 6 pairs labelled")
    lines = label_lines(run_dir)
    assert len(lines) == 2 and (lines[1]["group"], lines[1]["a"], lines[1]["b"], lines[1]["choice"]) == (0, 0, 2, "tie")
    assert driver.find_element(By.ID, "error").text == ""

    for count in range(3, 7):
        wait.until(lambda d: d.find_element(By.ID, "choose-a").is_enabled())  # keys wait for the shown pair's images
        driver.find_element(By.TAG_NAME, "body").send_keys("1")
        wait.until(lambda d: progress() == f"{count} of 6 pairs labelled")
    done = driver.find_element(By.ID, "done")
    wait.until(lambda d: done.is_displayed())
    assert f"diffpo train {run_dir / 'config.yaml'} resume_from=latest" in done.text
    assert [line["choice"] for line in label_lines(run_dir)] == ["b", "tie", "a", "a", "a", "a"]


def test_with_an_api_key_the_printed_url_opens_the_page_and_a_click_is_saved(driver, run_dir):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    with label_server_thread(run_dir, api_key="a key/with+odd chars") as server:
        driver.get(server.url)  # without the key: refused
        assert "requires an API key" in driver.find_element(By.TAG_NAME, "body").text
        driver.get(server.login_url)  # the key once; the page, its images and its posts then use the cookie
        wait = WebDriverWait(driver, 20)
        wait.until(lambda d: d.find_element(By.ID, "choose-a").is_enabled())
        assert driver.current_url == server.url  # the key is gone from the address bar
        driver.find_element(By.ID, "choose-a").click()
        wait.until(lambda d: d.find_element(By.ID, "progress").text == "1 of 6 pairs labelled")
    [line] = label_lines(run_dir)
    assert (line["group"], line["a"], line["b"], line["choice"]) == (0, 0, 1, "a")
