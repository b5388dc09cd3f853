"""The HTML report (`dfs_merge.report`, `dfs-merge report`): what it reads, when a run rewrites it, and what a
real browser renders.

The runs are tiny synthetic searches (tests/synthetic.py: no model is loaded). The browser tests drive Debian's
headless Chromium through selenium and /usr/bin/chromedriver (`.ci/run` installs both); without them they are
skipped, saying why.
"""

from __future__ import annotations

import html
import json
import math
import re
import shutil
from pathlib import Path

import pytest
from synthetic import QUIET, TargetRecipe, TargetRoute, evals, make_config, write_fake_sources

from dfs_merge.cli import main
from dfs_merge.report import LiveReport, write_report
from dfs_merge.search.evolution import run_evolution

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


def page_rows(page: Path) -> list[dict]:
    """The table's rows as the page embeds them."""
    text = page.read_text(encoding="utf-8")
    m = re.search(r'<script type="application/json" id="report-data">(.*?)</script>', text, re.S)
    assert m, "no report data in the page"
    return json.loads(m.group(1))["rows"]


def lines(run: Path) -> int:
    return len((run / "evals.jsonl").read_text().splitlines())


@pytest.fixture(scope="module")
def dfs_run(tmp_path_factory) -> Path:
    """A finished NSGA-II route search (score vs hops): its folder, report.html written by the run."""
    root = tmp_path_factory.mktemp("report_dfs")
    cfg = make_config(write_fake_sources(root / "src"), root / "run", algorithm="nsga2",
                      objectives=["score", "hops"], generations=3)
    run_evolution(cfg, evaluate=TargetRoute(), **QUIET)
    return root / "run"


@pytest.fixture(scope="module")
def recipe_run(tmp_path_factory) -> Path:
    """A finished parameter-space (TIES recipe) search over three fake sources."""
    root = tmp_path_factory.mktemp("report_recipe")
    cfg = make_config(write_fake_sources(root / "src", n=3), root / "run", generations=2,
                      merge={"method": "ties", "base": 0, "layer_groups": 2})
    run_evolution(cfg, evaluate=TargetRecipe(), **QUIET)
    return root / "run"


@pytest.fixture()
def killed_run(dfs_run, tmp_path) -> Path:
    """The DFS run as if killed mid-generation before its first checkpoint: a truncated last line, no checkpoint."""
    run = tmp_path / "killed"
    shutil.copytree(dfs_run, run)
    (run / "checkpoint.json").unlink()
    (run / "report.html").unlink()
    with open(run / "evals.jsonl", "a") as f:
        f.write('{"generation": 4, "key": "abc", "score": -1.')
    return run


def test_a_run_writes_a_self_contained_report_with_one_row_per_evaluation(dfs_run, recipe_run):
    for run in (dfs_run, recipe_run):
        page = run / "report.html"
        text = page.read_text(encoding="utf-8")
        assert len(page_rows(page)) == lines(run)
        # nothing is fetched: every script, style and picture is inline
        assert not re.findall(r"<(?:script|link|img|iframe)\b[^>]*\b(?:src|href)\s*=\s*(?!['\"]?data:)", text)
        assert "Plotly.newPlot" in text and "data:image/png;base64," in text
    assert "<pre>ties over 0:" not in (dfs_run / "report.html").read_text()
    assert "weight" in (recipe_run / "report.html").read_text()  # the recipe's table under its picture


def page_data(page: Path) -> dict:
    """Everything the page embeds for its script (`report.report_data`)."""
    m = re.search(r'<script type="application/json" id="report-data">(.*?)</script>', page.read_text(), re.S)
    assert m, "no report data in the page"
    return json.loads(m.group(1))


@pytest.mark.parametrize("which", ["dfs", "recipe"])
def test_the_written_page_holds_what_evals_jsonl_holds(dfs_run, recipe_run, tmp_path, which):
    """`dfs-merge report RUN --out PAGE` end to end: each table row is its logged evaluation (route or recipe,
    hops, score, each task's value, documents, seconds, error), the best point is best.genome.yaml's evaluation,
    the history's best is the best logged up to each generation, and the page shows the run's config.yaml."""
    from dfs_merge.genome_files import genome_from_dict, load_genome

    run = {"dfs": dfs_run, "recipe": recipe_run}[which]
    page = tmp_path / "page.html"
    assert main(["report", str(run), "--out", str(page)]) == 0
    data, logged = page_data(page), evals(run)
    tasks = [c["label"].split(" (")[0] for c in data["columns"][5:-3]]
    assert tasks == list(logged[0]["evaluation"]["tasks"])
    assert len(data["rows"]) == len(logged)
    for i, (row, rec) in enumerate(zip(data["rows"], logged, strict=True), start=1):
        ev = rec["evaluation"]
        shown = genome_from_dict(rec["genome"])
        text = shown.text() if which == "recipe" else shown.decode().text()
        assert row["v"][:5] == [i, rec["generation"], text, rec["hops"], rec["score"]]
        assert row["v"][5:-3] == [ev["tasks"][t]["value"] for t in tasks]
        assert row["v"][-3:] == [sum(ev["tasks"][t]["docs"] for t in tasks), rec["seconds"], rec["error"] or ""]
    best = load_genome(run / "best.genome.yaml").key()
    assert data["best"]["y"] == [next(r["score"] for r in logged if r["key"] == best)]
    assert data["all"]["y"] == [r["score"] for r in logged if r["error"] is None]
    for h in data["history"]:
        assert h["best"] == max(r["score"] for r in logged if r["generation"] <= h["generation"])
    assert html.escape((run / "config.yaml").read_text().strip()) in page.read_text()


def test_a_killed_run_is_reported_and_its_log_left_as_it_is(killed_run):
    before = (killed_run / "evals.jsonl").read_bytes()
    page = write_report(killed_run)
    assert (killed_run / "evals.jsonl").read_bytes() == before  # the partial line is skipped, not cut off
    assert len(page_rows(page)) == lines(killed_run) - 1
    text = page.read_text()
    assert "partial line" in text and "no generation checkpointed yet" in text


def test_broken_files_are_notes_not_failures(dfs_run, tmp_path):
    run = tmp_path / "broken"
    shutil.copytree(dfs_run, run)
    with open(run / "evals.jsonl", "a") as f:
        f.write('not json\n[1, 2]\n{"generation": "x", "tasks": [1], "evaluation": {"tasks": 3}, "error": 5}\n')
    (run / "checkpoint.json").write_text("{")
    (run / "best.genome.yaml").write_text("format: [")
    text = write_report(run, tmp_path / "r.html").read_text()
    assert len(page_rows(tmp_path / "r.html")) == lines(run) - 2
    assert "2 line(s) that are not JSON records" in text and "checkpoint.json could not be read" in text


def test_evaluations_newer_than_the_checkpoint_are_the_generation_in_progress(dfs_run, tmp_path):
    run = tmp_path / "behind"
    shutil.copytree(dfs_run, run)
    state = json.loads((run / "checkpoint.json").read_text())
    state.update(generation=1, finished=False, history=state["history"][:2])
    (run / "checkpoint.json").write_text(json.dumps(state))
    newer = sum(1 for e in evals(run) if e["generation"] > 1)
    text = write_report(run, tmp_path / "r.html").read_text()
    assert f"generation 1 of 3 checkpointed; {newer} evaluation(s) of generations 2-3 logged since" in text
    assert "more generation(s)" in text  # an estimate of the time left


def test_the_report_is_rewritten_at_each_checkpoint(tmp_path, monkeypatch):
    import dfs_merge.report

    monkeypatch.setattr(dfs_merge.report, "SHARE", math.inf)  # these generations are far quicker than a report
    seen: list[int] = []

    class Watching(TargetRoute):
        """Records the rows of report.html whenever it changed since the last evaluation."""

        stamp = None

        def __call__(self, genome):
            page = tmp_path / "run" / "report.html"
            if page.exists() and page.stat().st_mtime_ns != self.stamp:
                self.stamp = page.stat().st_mtime_ns
                seen.append(len(page_rows(page)))
            return super().__call__(genome)

    cfg = make_config(write_fake_sources(tmp_path / "src"), tmp_path / "run", generations=3)
    run_evolution(cfg, evaluate=Watching(), **QUIET)
    per_gen = [sum(1 for e in evals(tmp_path / "run") if e["generation"] <= g) for g in range(3)]
    assert seen == per_gen  # before generations 1, 2, 3: everything evaluated up to the one before


def test_a_failing_report_is_one_warning_and_the_run_goes_on(tmp_path, monkeypatch):
    import dfs_merge.report

    def broken(*_a, **_k):
        raise RuntimeError("no room")

    monkeypatch.setattr(dfs_merge.report, "render", broken)
    logged: list[str] = []
    cfg = make_config(write_fake_sources(tmp_path / "src"), tmp_path / "run", generations=2)
    result = run_evolution(cfg, evaluate=TargetRoute(), progress=False, log=logged.append)
    assert result.generations == 2 and not (tmp_path / "run" / "report.html").exists()
    assert [m for m in logged if "report.html" in m] == ["warning: report.html not written: RuntimeError: no room"]


@pytest.mark.slow  # a browser, or a run made to be slow
def test_a_slow_report_waits_for_the_history_schedule(dfs_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(dfs_run, run)
    for slow in ({"slow_s": 0.0}, {"share": 0.0}):  # slower than 1 s; or than a tenth of a generation
        live = LiveReport(run, log=lambda *_: None, **slow)
        assert live.refresh(due=False) and live.refresh(due=False)  # the first write is not judged
        assert live.refresh(due=False) is None
        assert live.refresh(due=True) == run / "report.html"
    quick = LiveReport(run, log=lambda *_: None, share=math.inf)
    assert all(quick.refresh(due=False) for _ in range(3))


def test_cli_report(dfs_run, tmp_path, capsys):
    out = tmp_path / "r.html"
    assert main(["report", str(dfs_run), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {out}"
    assert main(["report", str(dfs_run), "--out", str(out)]) == 2
    assert "already exists; pass --force" in capsys.readouterr().err
    assert main(["report", str(dfs_run), "--out", str(out), "--force"]) == 0
    assert main(["report", str(dfs_run), "--out", str(dfs_run / "evals.jsonl"), "--force"]) == 2
    assert "an output never overwrites an input" in capsys.readouterr().err
    for bad, why in ((tmp_path / "missing", "not a folder"), (tmp_path, "not a run folder")):
        assert main(["report", str(bad)]) == 2
        err = capsys.readouterr().err
        assert why in err and err.count("\n") == 1


# ---------------------------------------------------------------------------------------------- in a browser


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium driven by selenium; skipped when either is missing."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e .[test])")
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip("no /usr/bin/chromium and /usr/bin/chromedriver (apt-get install chromium chromium-driver; "
                    ".ci/run installs them)")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1800"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=opts)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def open_report(driver, page: Path, shot: Path):
    """Load the page, wait for its script to finish, save a screenshot; returns the console's errors."""
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get_log("browser")  # drop what an earlier page logged
    driver.get(page.resolve().as_uri())
    WebDriverWait(driver, 60).until(lambda d: d.execute_script("return document.body.dataset.ready === '1'"))
    driver.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
    return [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]


def rendered(driver) -> dict:
    return driver.execute_script("""
        const q = s => document.querySelectorAll(s).length;
        return {rows: q('#evals tbody tr'), svg: q('#plot-history .main-svg') + q('#plot-front .main-svg'),
                history_points: q('#plot-history .scatterlayer .point'), front_points: q('#plot-front .scatterlayer .point'),
                pictures: [...document.querySelectorAll('#pictures img')].map(i => i.naturalWidth),
                count: document.getElementById('count').textContent};""")


@pytest.mark.slow  # a browser, or a run made to be slow
def test_browser_renders_a_route_run(browser, dfs_run, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    errors = open_report(browser, dfs_run / "report.html", tmp_path / "dfs.png")
    assert errors == []
    dom = rendered(browser)
    n = lines(dfs_run)
    assert dom["rows"] == n and dom["count"] == f"showing {n} of {n} evaluations"
    assert dom["svg"] >= 2 and dom["history_points"] >= 4 and dom["front_points"] > 0
    assert dom["pictures"] and min(dom["pictures"]) > 0
    # hovering a front member shows its route
    routes = [r["route"] for r in json.loads((dfs_run / "pareto.json").read_text())]
    point = browser.find_elements(By.CSS_SELECTOR, "#plot-front .scatterlayer .trace:nth-child(2) .point")[0]
    ActionChains(browser).move_to_element(point).perform()
    hover = browser.execute_script("return document.querySelector('#plot-front .hoverlayer').textContent")
    assert "hops, generation" in hover and any(r in hover for r in routes)
    # sorting by score puts the best first (second click: descending); filtering keeps matching rows only
    head = [th for th in browser.find_elements(By.CSS_SELECTOR, "#evals th") if th.text.startswith("score")][0]
    head.click()
    head.click()
    scores = [float(e["score"]) for e in evals(dfs_run)]
    first = browser.find_element(By.CSS_SELECTOR, "#evals tbody tr").find_elements(By.TAG_NAME, "td")[4].text
    assert float(first) == pytest.approx(max(scores), abs=1e-4)
    route = evals(dfs_run)[0]["genome"]["route"]
    browser.find_element(By.ID, "filter").send_keys(route)
    shown = browser.find_elements(By.CSS_SELECTOR, "#evals tbody tr")
    assert 1 <= len(shown) < n and all(route in tr.text for tr in shown)
    assert [e for e in browser.get_log("browser") if e["level"] == "SEVERE"] == []


@pytest.mark.slow  # a browser, or a run made to be slow
def test_browser_renders_a_recipe_run(browser, recipe_run, tmp_path):
    assert open_report(browser, recipe_run / "report.html", tmp_path / "recipe.png") == []
    dom = rendered(browser)
    assert dom["rows"] == lines(recipe_run)
    assert dom["svg"] >= 2 and dom["front_points"] > 0 and dom["pictures"] and min(dom["pictures"]) > 0


@pytest.mark.slow  # a browser, or a run made to be slow
def test_browser_renders_a_killed_run(browser, killed_run, tmp_path):
    page = write_report(killed_run)
    assert open_report(browser, page, tmp_path / "killed.png") == []
    dom = rendered(browser)
    assert dom["rows"] == lines(killed_run) - 1 and dom["front_points"] > 0
