"""The dashboard as a person sees it: `tuner dashboard` on loopback, a trial's page in headless Chromium."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
from optuna.artifacts import get_all_artifact_meta
from PIL import Image

from tests.conftest import invoke, tiny_space, unavailable, write_space
from tuner.search.storage import load_existing_study

PLOTS = ("curves.png", "val_confusion_matrix.png", "val_roc_pr.png")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=5) as response:
        assert response.status == 200
        return response.read()


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if found is None:
        unavailable("Chromium", "apt-get install chromium, as .ci/run does")
    return found


def _served(tmp_path_factory, space: dict):
    """The study of ``space`` run, and `tuner dashboard` serving it on a free loopback port."""
    workdir = tmp_path_factory.mktemp("dashboard")
    name = space["study"]["name"]
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(workdir)
        result = invoke("optimize", "--space", write_space(workdir / "s.yaml", space))
        assert result.exit_code == 0, result.output
        study = load_existing_study(name, None)
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tuner", "dashboard", "--study", name, "--port", str(port)],
        cwd=workdir,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(150):
            try:
                _get(f"{base}/api/studies")
                break
            except OSError:
                time.sleep(0.2)
        else:
            pytest.fail("optuna-dashboard did not start: " + (proc.stderr.read() if proc.poll() is not None else ""))
        yield base, study
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def dashboard(tmp_path_factory):
    """A finished study with its trial plots, served (one for the module's tests: they only read)."""
    space = tiny_space(study={"n_trials": 2}, train={"max_epochs": 3, "patience": None, "device": "cpu"})
    yield from _served(tmp_path_factory, space)


def _browser() -> list[str]:
    """Headless Chromium at a fixed window size, given time to render the page's scripts."""
    browser = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]
    return [*browser, "--virtual-time-budget=20000", "--window-size=1400,2000"]


def _dom(page: str) -> str:
    return subprocess.run([*_browser(), "--dump-dom", page], capture_output=True, text=True, timeout=120).stdout


def test_dashboard_api_serves_the_study_its_trials_and_their_plots(dashboard):
    base, study = dashboard
    entry = next(s for s in json.loads(_get(f"{base}/api/studies"))["study_summaries"] if s["study_name"] == "tiny")
    assert len(json.loads(_get(f"{base}/api/studies/{entry['study_id']}"))["trials"]) == 2
    for trial in study.trials:
        metas = {m.filename: m for m in get_all_artifact_meta(trial, storage=study._storage)}
        assert set(PLOTS) | {"val_per_class.csv"} <= set(metas)
        for name in PLOTS:  # drawn in the background after the trial, written under the ids registered during it
            png = _get(f"{base}/artifacts/{entry['study_id']}/{trial._trial_id}/{metas[name].artifact_id}")
            assert png.startswith(b"\x89PNG") and len(png) > 5000, name


def test_a_trial_page_in_a_real_browser_shows_its_plots(dashboard, tmp_path):
    base, study = dashboard
    best = study.best_trial
    page = f"{base}/dashboard/studies/{study._study_id}/trials?numbers={best.number}"
    dom = _dom(page)
    assert f"Trial {best.number}" in dom, dom[:2000]
    # Each plot is an <img> whose source is that trial's artifact, as the page rendered it.
    ids = {m.filename: m.artifact_id for m in get_all_artifact_meta(best, storage=study._storage)}
    for name in PLOTS:
        assert f'alt="{name}"' in dom and f"/artifacts/{study._study_id}/{best._trial_id}/{ids[name]}" in dom, name
    assert "val_per_class.csv" in dom
    screenshot = tmp_path / "trial_page.png"
    subprocess.run([*_browser(), f"--screenshot={screenshot}", page], capture_output=True, timeout=120, check=True)
    pixels = np.asarray(Image.open(screenshot).convert("L"), dtype=np.float32)
    assert pixels.shape == (2000, 1400) and pixels.std() > 10, "a rendered page, not a blank one"
    # The artifact cards (below the trial's details) hold images: many distinct grey levels there.
    assert len(np.unique(pixels[700:1100, 250:1150])) > 50


def test_a_multi_objective_study_shows_its_pareto_front_with_the_objectives_named(tmp_path_factory):
    space = tiny_space(study={"name": "front", "metrics": ["val_auroc", "params_m"], "n_trials": 4})
    space["params"]["width"] = {"choices": [2, 4, 8]}
    for base, study in _served(tmp_path_factory, space):
        detail = json.loads(_get(f"{base}/api/studies/{study._study_id}"))
        assert detail["directions"] == ["maximize", "minimize"]
        assert sorted(t["number"] for t in detail["best_trials"]) == sorted(t.number for t in study.best_trials)
        dom = _dom(f"{base}/dashboard/studies/{study._study_id}")
        start = dom.index("Pareto Front")
        front = dom[start : dom.index("History", start)]  # its card, up to the next one's title
        assert ">val_auroc<" in front and ">params_m<" in front  # the axes' objectives, by name
        completed = [t for t in study.trials if t.state.name == "COMPLETE"]
        assert front.count('class="point"') == len(completed) >= 2  # every completed trial drawn
