"""The dashboard in a real headless browser (Debian's chromium driven by Playwright).

The service runs for real on loopback (uvicorn in a thread, SQLite, local object store) and its
jobs are produced by the real worker code: one job is run to completion by ``worker.tasks.execute``
on the tiny Llama with the evolutionary search (so its report, generations and artifacts are
genuine), another is left running in a background thread with a long search, which the test
watches grow live and then cancels from the page. A screenshot is saved to tests/artifacts/.
"""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import pytest

from tests.live_server import LiveServer

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
TEAM = "browser-team"

if not Path(CHROMIUM).exists() and not shutil.which("chromium"):
    pytest.skip("Debian's chromium is not installed (apt-get install -y chromium; scripts/install.sh does it)",
                allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright for Python is not installed")


# What the job page shows of a running search: the generation its live sparsity note names, and the
# number of points of the best-fitness line (one per generation received).
_SHOWN_GENERATION = """() => {
  const m = /generation (\\d+)/.exec(document.getElementById("sparsity-note").textContent || "");
  const d = (document.querySelector('#fitness-chart path[data-series="best"]') || {getAttribute: () => ""})
    .getAttribute("d") || "";
  return {generation: m ? Number(m[1]) : null, points: (d.match(/[ML]/g) || []).length};
}"""


def _spec(model_dir: Path, generations: int, seed: int, sparsity: float = 0.6, pattern: str = "unstructured",
          name: str | None = None, labels: dict | None = None, **extra: object) -> dict:
    from evosparse.jobs.spec import JobSpec

    return JobSpec(
        model=str(model_dir), sparsity=sparsity, pattern=pattern, pruner="wanda", allocation="evolutionary",
        calib_windows=4, eval_windows=4, seq_len=64, seed=seed, name=name, labels=labels or {},
        search={"generations": generations, "offspring": 4, "selection": "64:2,128:1", "seed_from": "fisher"},
        **extra,
    ).model_dump(mode="json")


@pytest.fixture(scope="module")
def service(tmp_path_factory, tiny_llama_dir):
    """Settings + app + an API key + one SUCCEEDED job and one RUNNING job (real worker code)."""
    from evosparse.api.main import create_app
    from evosparse.jobs import repo
    from evosparse.jobs.db import session_scope
    from evosparse.jobs.models import Job
    from evosparse.jobs.settings import Settings
    from evosparse.worker.tasks import execute

    data = tmp_path_factory.mktemp("dash-service")
    settings = Settings(data_dir=data, allowed_model_roots=[Path(tiny_llama_dir).parent],
                        max_generations=100_000, heartbeat_s=1.0)
    app = create_app(settings)  # runs the migrations
    url = settings.resolved_database_url
    with session_scope(url) as db:
        token, key = repo.create_api_key(db, TEAM)
        team_id = key.team_id

    def claimed(spec: dict) -> repo.Claim:
        with session_scope(url) as db:
            job, _ = repo.create_job(db, team_id, spec)
            claim = repo.claim_job(db, job.id, "browser-test-worker", settings.stale_after_s, settings.max_attempts)
        assert isinstance(claim, repo.Claim), claim
        return claim

    # The finished job searches a per-layer N:8 (mixed:8) so its bars carry each layer's pattern, and
    # scores the offline lm-eval task so its page shows task accuracy.
    pytest.importorskip("lm_eval", reason="lm-eval (the [eval] extra) is not installed")
    finished = claimed(_spec(tiny_llama_dir, generations=4, seed=1, sparsity=0.625, pattern="mixed:8",
                             name="mixed-search", labels={"sweep": "a"},
                             eval_tasks=["pydoc_cloze"], eval_tasks_limit=8))
    assert execute(finished, settings) == "SUCCEEDED"
    # A second finished job to compare with the first (another pattern, sparsity and length of search).
    other = claimed(_spec(tiny_llama_dir, generations=3, seed=3, sparsity=0.5, name="plain-search",
                          labels={"sweep": "a"}))
    assert execute(other, settings) == "SUCCEEDED"

    # A long search in the background: the page must show it grow, then cancel it.
    running = claimed(_spec(tiny_llama_dir, generations=100_000, seed=2, name="live-search"))
    outcome: dict[str, str] = {}
    runner = threading.Thread(target=lambda: outcome.setdefault("status", execute(running, settings)),
                              daemon=True, name="dash-running-job")
    runner.start()
    try:
        yield {"app": app, "token": token, "finished": finished.job_id, "running": running.job_id,
               "other": other.job_id,
               "settings": settings, "outcome": outcome, "runner": runner}
    finally:
        with session_scope(url) as db:  # whatever the test did, stop the background job
            job = db.get(Job, running.job_id)
            if job is not None and job.status == "RUNNING":
                repo.request_cancel(db, job)
        runner.join(timeout=120)


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium"),
                              args=CHROMIUM_FLAGS)
        try:
            yield b
        finally:
            b.close()


def _generation_count(service: dict, job_id: str) -> int:
    from evosparse.jobs import repo
    from evosparse.jobs.db import session_scope

    with session_scope(service["settings"].resolved_database_url) as db:
        return len(repo.generations_of(db, job_id))


def _report(service: dict, job_id: str) -> dict:
    from evosparse.jobs.db import session_scope
    from evosparse.jobs.models import Job

    with session_scope(service["settings"].resolved_database_url) as db:
        return db.get(Job, job_id).report


def test_dashboard_in_a_real_browser(service, browser) -> None:
    expect = sync_api.expect
    page_errors: list[str] = []
    foreign: list[str] = []
    with LiveServer(service["app"]) as base:
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.on("pageerror", lambda e: page_errors.append(str(e)))
        # The page must load nothing from other hosts (the machine may be offline).
        page.on("request", lambda r: None if r.url.startswith((base, "data:", "blob:")) else foreign.append(r.url))

        # 1. First visit: no key yet -> the key form; a wrong key is refused with a message.
        page.goto(base + "/")
        expect(page.locator("#key-view")).to_be_visible()
        page.fill("#key-input", "evs_not-a-real-key")
        page.click("#key-form button")
        expect(page.locator("#key-error")).to_contain_text("rejected")

        # 2. The right key -> the job list with both jobs and their statuses.
        page.fill("#key-input", service["token"])
        page.click("#key-form button")
        rows = page.locator("#jobs-table tbody tr")
        expect(rows).to_have_count(3)
        expect(page.locator(f'tr[data-job-id="{service["finished"]}"] .badge')).to_have_text("SUCCEEDED")
        expect(page.locator(f'tr[data-job-id="{service["running"]}"] .badge')).to_have_text("RUNNING")
        assert page.evaluate("localStorage.getItem('evosparse.apiKey')") == service["token"]

        # 3. The finished job: fitness chart, sparsity bars, perplexity table, artifact links.
        page.click(f'tr[data-job-id="{service["finished"]}"] a')
        expect(page.locator("#job-status")).to_have_text("SUCCEEDED")
        expect(page.locator('#fitness-chart path[data-series="best"]')).to_have_count(1)
        expect(page.locator('#fitness-chart path[data-series="mean"]')).to_have_count(1)
        # one dot per generation per series, straight from the generation history
        n_gen = _generation_count(service, service["finished"])
        assert n_gen >= 2
        expect(page.locator("#fitness-chart circle.s-best")).to_have_count(n_gen)
        report = _report(service, service["finished"])
        units = report["search"]["units"]
        expect(page.locator("#sparsity-chart rect.bar.s-best")).to_have_count(len(units))
        expect(page.locator("#sparsity-chart rect.bar.s-uniform")).to_have_count(len(units))
        # each searched bar is labelled with its layer's N:M pattern from report.json
        tags = page.locator("#sparsity-chart text.bar-tag")
        expect(tags).to_have_count(len(units))
        first_linear = next(n for n in report["layer_pattern"] if n.startswith(units[0] + "."))
        expect(tags.first).to_have_text(report["layer_pattern"][first_linear])
        expect(page.locator("#sparsity-note")).to_contain_text("N:M pattern")
        ppl = page.locator("#ppl-table tbody tr")
        expect(ppl).to_have_count(3)
        expect(page.locator('#ppl-table tr[data-row="dense"] td.num').first).to_have_text(
            f"{report['perplexity']['dense']:.2f}")
        expect(page.locator('#ppl-table tr[data-row="searched"] td.num').first).to_have_text(
            f"{report['perplexity']['pruned']:.2f}")
        expect(page.locator('#ppl-table tr[data-row="uniform"] td.num').first).to_have_text(
            f"{report['perplexity']['uniform']:.2f}")
        # the lm-eval task the spec asked for, dense and pruned accuracy as report.json has them
        cloze = report["lm_eval"]["results"]["pydoc_cloze"]
        row = page.locator('#tasks-table tr[data-task="pydoc_cloze"] td')
        expect(row.nth(1)).to_have_text(str(cloze["samples"]))
        expect(row.nth(2)).to_contain_text(f"{100 * cloze['dense']['acc']:.1f} %")
        expect(row.nth(3)).to_contain_text(f"{100 * cloze['pruned']['acc']:.1f} %")
        expect(page.locator("#job-facts")).to_contain_text("pydoc_cloze")
        expect(page.locator('a.artifact[data-name="report.json"]')).to_be_visible()
        expect(page.locator('a.artifact[data-name="README.md"]')).to_be_visible()  # the model card
        expect(page.locator('a.artifact[data-name="recipe.yaml"]')).to_be_visible()
        assert page.locator("a.artifact").count() >= 3  # config, weights, report at least
        expect(page.locator("#conn")).to_have_text("finished")  # a finished job stops polling
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)

        # The artifact link downloads through the API with the key (a plain <a> cannot send it).
        with page.expect_download() as dl:
            page.click('a.artifact[data-name="report.json"]')
        saved = dl.value.path()
        assert b'"global_sparsity"' in Path(saved).read_bytes()

        # The generation history as CSV, one row per generation (downloaded with the key).
        with page.expect_download() as dl:
            page.click("#export-csv")
        table = Path(dl.value.path()).read_text().splitlines()
        assert table[0].startswith("generation,attempt,best,mean") and len(table) == 1 + n_gen

        # 3b. The list: search, sort by a column, tick two jobs and compare them.
        page.goto(base + "/#/")
        expect(rows).to_have_count(3)
        page.fill("#job-search", "PLAIN")
        expect(rows).to_have_count(1)
        expect(rows.first).to_have_attribute("data-job-id", service["other"])
        page.fill("#job-search", "")
        expect(rows).to_have_count(3)
        page.click('th[data-sort="name"]')
        by_name = [service["running"], service["finished"], service["other"]]  # live-, mixed-, plain-search
        for i, job_id in enumerate(by_name):  # (the newest-first order had the running job first too)
            expect(rows.nth(i)).to_have_attribute("data-job-id", job_id)
        expect(page.locator('th[data-sort="name"]')).to_have_class("sortable sorted-asc")
        page.click('th[data-sort="name"]')
        for i, job_id in enumerate(reversed(by_name)):
            expect(rows.nth(i)).to_have_attribute("data-job-id", job_id)
        expect(page.locator("#compare-btn")).to_be_disabled()
        for job_id in (service["finished"], service["other"]):
            page.check(f'tr[data-job-id="{job_id}"] input.compare-pick')
        page.click("#compare-btn")
        expect(page.locator("#compare-view")).to_be_visible()
        expect(page.locator("#compare-title")).to_have_text("Compare 2 jobs")
        # fitness curves overlaid: one line per job, one point per generation of that job
        expect(page.locator("#compare-fitness path.series")).to_have_count(2)
        other_gen = _generation_count(service, service["other"])
        expect(page.locator("#compare-fitness circle.s-c0")).to_have_count(n_gen)
        expect(page.locator("#compare-fitness circle.s-c1")).to_have_count(other_gen)
        # per-unit sparsity side by side: one bar per unit per job, the values of each report
        other_report = _report(service, service["other"])
        expect(page.locator("#compare-sparsity rect.bar.s-c0")).to_have_count(len(report["search"]["best_vector"]))
        expect(page.locator("#compare-sparsity rect.bar.s-c1")).to_have_count(len(other_report["search"]["best_vector"]))
        # one perplexity table, one row per job, the reports' numbers
        for job_id, rep in ((service["finished"], report), (service["other"], other_report)):
            row = page.locator(f'#compare-table tr[data-job-id="{job_id}"]')
            expect(row.locator("td.ppl-pruned")).to_have_text(f"{rep['perplexity']['pruned']:.2f}")
            expect(row.locator("td.ppl-dense")).to_have_text(f"{rep['perplexity']['dense']:.2f}")
        page.screenshot(path=str(ARTIFACTS / "dashboard-compare.png"), full_page=True)

        # /docs: Swagger UI from this server's own files, with the Bearer key declared ("Authorize").
        page.goto(base + "/docs")
        expect(page.locator(".swagger-ui .info .title")).to_contain_text("evosparse")
        expect(page.locator(".swagger-ui button.authorize")).to_be_visible()

        # 4. The running job: the chart grows without a reload, then the Cancel button stops the job.
        # Waits go on what the page guarantees whatever the machine's speed: the latest generation it
        # names and one point per generation on the best-fitness line (dots are thinned on long runs,
        # so their count says nothing once the job is past a few hundred generations).
        page.goto(base + "/#/jobs/" + service["running"])
        expect(page.locator("#job-status")).to_have_text("RUNNING")
        note = page.locator("#sparsity-note")
        expect(note).to_contain_text("updates live", timeout=60_000)
        expect(page.locator('#fitness-chart path[data-series="best"]')).to_have_count(1)
        shown = page.evaluate(_SHOWN_GENERATION)
        assert shown["generation"] is not None and shown["points"] >= 1, shown
        page.evaluate("window.__sameDocument = true")  # survives only if the page is never reloaded
        page.wait_for_function(f"(before) => {{ const now = ({_SHOWN_GENERATION})(); "
                               "return now.generation > before.generation && now.points > before.points; }",
                               arg=shown, timeout=60_000)  # a later generation arrived and was drawn
        expect(page.locator("#sparsity-chart rect.bar.s-best").first).to_be_attached()
        page.screenshot(path=str(ARTIFACTS / "dashboard-running.png"), full_page=True)
        page.once("dialog", lambda d: d.accept())
        page.click("#cancel-job")
        expect(page.locator("#job-status")).to_have_text("CANCELLED", timeout=60_000)
        assert page.evaluate("window.__sameDocument === true")
        expect(page.locator("#cancel-job")).to_be_hidden()

    service["runner"].join(timeout=60)
    assert service["outcome"].get("status") == "CANCELLED"
    assert not page_errors, page_errors
    assert not foreign, f"the page requested other hosts: {foreign}"
