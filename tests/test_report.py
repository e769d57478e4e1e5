"""The HTML report (``vitlens report``): built from ``evaluate --out`` files alone, every section present,
every picture embedded, numbers equal to the results file, and rendered by a real browser (headless
Chromium) with the gallery and the metric table visible."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import committed
from vitlens.cli import main
from vitlens.errors import VitlensError
from vitlens.metrics import evaluate
from vitlens.viz.report import build_report, load_results, write_report

SECTIONS = ("verdict", "run", "gallery", "meanings", "bcos", "metrics", "curves", "cost", "per-class")
DATA_URI = re.compile(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> list[Path]:
    """Two small results files: baselines on the counting classifier, DiffMask on its gates."""
    tmp = tmp_path_factory.mktemp("results")
    files = [tmp / "baselines.json", tmp / "diffmask.json"]
    evaluate(committed("counting-vit"), "rollout,attention", "all", "counting:test", limit=12, batch_size=12,
             out=files[0], progress=False, gallery=3)  # fmt: skip
    evaluate(committed("counting-vit-diffmask"), "diffmask", "pointing-game,maxboxacc,deletion", "counting:test",
             limit=12, batch_size=12, out=files[1], progress=False, gallery=3)  # fmt: skip
    return files


def pictures(page: str) -> list[Image.Image]:
    return [Image.open(io.BytesIO(base64.b64decode(b))) for b in DATA_URI.findall(page)]


def test_results_file_carries_what_the_report_needs(results):
    data = json.loads(results[0].read_text())
    assert data["classes"] == [str(k) for k in range(10)] or len(data["classes"]) == 10
    assert {"vitlens", "torch", "python"} <= set(data["versions"])
    cost = data["cost"]["methods"]
    assert set(cost) == {"rollout", "attention"} and all(c["ratio_to_forward"] > 0 for c in cost.values())
    g = data["gallery"]
    assert len(g["index"]) == 3 and len(g["image"]) == 3
    assert len(set(g["label"])) == 3  # one image per class while there are classes to pick from
    for m in ("rollout", "attention"):
        assert np.asarray(g["maps"][m]).shape == (3, 3, 3)  # counting-vit: 3×3 patch grid
    deletion = data["curves"]["rollout"]["deletion"]
    assert len(deletion["fraction"]) == len(deletion["probability"]) == 10  # 9 patches: 9 steps + 1


def test_gallery_maps_are_the_evaluated_maps(results):
    """The gallery shows the maps the metrics scored: the same explainer on the same images and targets."""
    import torch

    from vitlens import explain, load_model
    from vitlens.data import open_dataset

    data = json.loads(results[0].read_text())
    g = data["gallery"]
    ds = open_dataset("counting:test")
    images = torch.stack([ds[i]["image"] for i in g["index"]])
    model = load_model(committed("counting-vit"))
    maps = explain(model, images, "rollout", target=torch.tensor(g["label"])).maps
    torch.testing.assert_close(torch.tensor(g["maps"]["rollout"]), maps, rtol=1e-5, atol=1e-6)


def test_report_has_every_section_and_embeds_every_picture(results, tmp_path):
    out = write_report(results, tmp_path / "report.html")
    page = out.read_text()
    for section in SECTIONS:
        assert f'<section id="{section}">' in page, section
    srcs = re.findall(r'(?:src|href)="([^"]*)"', page)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)  # nothing to fetch
    assert "http://" not in page and "https://" not in page and "<script" not in page
    pics = pictures(page)
    assert len(pics) == len(srcs)
    for p in pics:
        p.load()  # a valid PNG
        assert p.size[0] > 20 and p.size[1] > 20
    # gallery: 3 images × (the image + rollout + attention + diffmask), then the curves figure
    gallery = page.split('<section id="gallery">')[1].split("</section>")[0]
    assert len(DATA_URI.findall(gallery)) == 3 * 4
    for label in ("rollout", "attention", "diffmask", "counting-vit-diffmask"):
        assert label in gallery
    assert "B-cos" in page and "No B-cos model" in page  # the section says why it is empty
    from vitlens.explainers import EXPLAINERS

    meaning = EXPLAINERS["diffmask"].meaning  # each method's one sentence, from its explainer class
    assert f"<dd>{meaning[:1].upper()}{meaning[1:]}. Values: absolute, 0–1." in page


def test_metric_table_equals_the_results_and_marks_the_best(results):
    runs = [load_results(p) for p in results]
    page, _ = build_report(runs)
    table = page.split('<section id="metrics">')[1].split("<details>")[0]
    header = re.findall(r"<th>([a-z0-9-]+)", table)
    cell = r'<td(?: class=(best|tie))?>([^<]*)(?:<span class="ci">\[([-0-9.]+), ([-0-9.]+)\]</span>)?</td>'
    rows = {
        re.search(r"<b>([a-z]+)</b>", r).group(1): re.findall(cell, r)
        for r in re.findall(r"<tr><td class='l m'>(.*?)</tr>", table)
    }
    assert set(rows) == {"rollout", "attention", "diffmask"}
    run_of = {m: run for run in runs for m in run["results"]}
    for key in header:
        for method, cells in rows.items():
            mark, text, lo, hi = cells[header.index(key)]
            run = run_of[method]
            value = run["results"][method].get(key)
            assert text == ("—" if value is None else f"{value:.3f}"), (method, key)
            if value is not None:  # every value carries its interval
                assert (float(lo), float(hi)) == tuple(round(x, 3) for x in run["intervals"][method][key])
            best = run["best"].get(key)  # marks only within a run, from its paired bootstrap
            want = "" if not best or method not in best["best"] else "best" if best["significant"] else "tie"
            assert mark == want, (method, key)
    assert not any(mark for mark, *_ in rows["diffmask"])  # alone in its run: never ranked
    assert any(mark for cells in rows.values() for mark, *_ in cells)
    assert "n = 12" in table and "95 % bootstrap interval" in page


def test_per_class_view_averages_the_per_image_values(results):
    run = load_results(results[0])
    page, _ = build_report([run])
    section = page.split('<section id="per-class">')[1].split("</section>")[0]
    label = dict(zip(run["images"]["index"], run["images"]["label"], strict=True))
    per = run["per_image"]["rollout"]["deletion"]
    for k in sorted(set(label[i] for i in per["index"]))[:3]:
        values = [v for i, v in zip(per["index"], per["probability"], strict=True) if label[i] == k]
        assert f"<td>{np.mean(values):.3f}</td>" in section
    assert "deletion ↓" in section and "pointing-game ↑" in section


def test_report_cli_and_errors(results, tmp_path, capsys):
    out = tmp_path / "r.html"
    assert main(["report", *map(str, results), "--out", str(out)]) == 0
    assert str(out) in capsys.readouterr().out and out.stat().st_size > 10_000
    bad = tmp_path / "bad.json"
    bad.write_text('{"something": 1}')
    assert main(["report", str(bad), "--out", str(tmp_path / "x.html")]) == 2
    assert "not a `vitlens evaluate --out` results file" in capsys.readouterr().err
    assert not (tmp_path / "x.html").exists()
    with pytest.raises(VitlensError, match="not found"):
        load_results(tmp_path / "missing.json")


def test_old_results_without_gallery_or_cost_still_report(results):
    data = json.loads(results[0].read_text())
    for key in ("gallery", "cost", "versions", "classes", "curves"):
        data.pop(key)
    page, sheet = build_report([data])
    assert sheet is None and "carry no gallery" in page and "No cost" in page
    for section in SECTIONS:
        assert f'<section id="{section}">' in page


def test_bcos_colour_explanations_in_the_report(tmp_path):
    """A (tiny, random) B-cos ViT: its colour explanation is carried by the results file and shown."""
    pytest.importorskip("einops")
    from vitlens import load_model
    from vitlens.models.checkpoint import save_checkpoint

    tiny = dict(img_size=32, num_classes=10, dim=32, depth=2, heads=4, mlp_dim=64, conv_stem=[8, 16, 32])
    ckpt = save_checkpoint(tmp_path / "bcos", load_model("bcos:bcos_vit_fashion?pretrained=0", **tiny), kind="bcos")
    out = tmp_path / "bcos.json"
    evaluate(ckpt, "bcos", "pointing-game", "counting:test", limit=4, batch_size=4, out=out, progress=False, gallery=2)
    page, _ = build_report([load_results(out)])
    section = page.split('<section id="bcos">')[1].split("</section>")[0]
    assert len(DATA_URI.findall(section)) == 2 * 2  # image + colour explanation per gallery image
    assert "No B-cos model" not in section


# --- a real browser ------------------------------------------------------------------------------------


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def run_chromium(binary: str, page: Path, *args: str) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory() as profile:
        cmd = [
            binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
            "--hide-scrollbars", *args, page.resolve().as_uri(),
        ]  # fmt: skip
        return subprocess.run(cmd, capture_output=True, text=True, timeout=90)


def screenshot(page: Path, png: Path, size: str = "1280,2400") -> np.ndarray:
    """The page rendered by headless Chromium, as an RGB array."""
    binary = chromium()
    if binary is None:
        pytest.skip("no chromium binary (Debian: apt-get install chromium; `make install` tries it)")
    proc = run_chromium(binary, page, f"--window-size={size}", f"--screenshot={png}")
    assert png.is_file(), proc.stderr[-2000:]
    return np.asarray(Image.open(png).convert("RGB"))


def test_report_renders_in_chromium(results, tmp_path):
    page = write_report(results, tmp_path / "report.html")
    shot = screenshot(page, tmp_path / "shot.png")
    assert shot.shape[:2] == (2400, 1280)
    assert shot.std() > 20  # not blank
    # the gallery: a dark table (#18181c) holding many distinct colours (the overlays drawn)
    dark = (np.abs(shot.astype(int) - [24, 24, 28]).sum(2) < 6).mean(1) > 0.05
    rows = np.flatnonzero(dark)
    assert len(rows) > 150, "no gallery band in the screenshot"
    band = shot[rows[0] : rows[-1]]
    assert len(np.unique(band.reshape(-1, 3), axis=0)) > 2000
    # the metric table: its best cells' green background (#e4f4e4) is on screen
    assert (np.abs(shot.astype(int) - [228, 244, 228]).sum(2) == 0).sum() > 200, "metric table not visible"
    dom = run_chromium(chromium(), page, "--dump-dom").stdout
    for text in ("What was run", "Gallery", "Metrics", "pointing-game", "rollout", "diffmask"):
        assert text in dom, text


def test_verdict_opens_the_report(results):
    runs = [load_results(p) for p in results]
    page, _ = build_report(runs)
    assert page.index('<section id="verdict">') < page.index('<section id="run">')
    verdict = page.split('<section id="verdict">')[1].split("</section>")[0]
    for key in runs[0]["best"]:
        if "/" not in key:
            assert key in verdict and (" is best on " in verdict or " tie for best on " in verdict)
    for method, values in runs[0]["results"].items():
        if values.get("sanity/pass") == 0.0:
            assert f"{method} <b>fails</b> the sanity check" in verdict
        elif values.get("sanity/pass") == 1.0:
            assert f"{method} passes the sanity check" in verdict


def test_metric_table_groups_methods_by_model_with_its_accuracy(results):
    runs = [load_results(p) for p in results]
    page, _ = build_report(runs)
    table = page[page.index('id="metrics"') :]
    groups = re.findall(r"<tr class=group><td class=l colspan=\d+><b>([^<]+)</b> · accuracy ([0-9.]+)</td></tr>", table)
    assert [g[0] for g in groups][:2] == ["vitlens:counting-vit", "vitlens:counting-vit-diffmask"]
    for (model, acc), run in zip(groups, runs, strict=False):
        assert model == run["model"] and float(acc) == pytest.approx(run["accuracy"], abs=5e-4)
    # every method row sits under its own model's heading
    first, second = table.index(groups[0][0]), table.index(groups[1][0])
    assert first < table.index("<b>rollout</b>") < second < table.index("<b>diffmask</b>")


def test_cost_carries_its_per_batch_noise(tmp_path):
    out = tmp_path / "r.json"
    evaluate(committed("counting-vit"), "rollout", "pointing-game", "counting:test", limit=12, batch_size=3,
             out=out, progress=False, gallery=0)  # fmt: skip
    cost = json.loads(out.read_text())["cost"]["methods"]["rollout"]
    assert cost["batches"] == 3  # four batches, the first one (warm-up) left out
    lo, hi = cost["ratio_p10_p90"]
    assert 0 < lo <= hi
    page, _ = build_report([load_results(out)])
    assert f"{lo:.2f}–{hi:.2f}× (3 batches)" in page


def test_gallery_pictures_shrink_to_fit_the_page():
    from vitlens.viz.report import CELL, PAGE, gallery_cell

    assert gallery_cell(2) == CELL
    for columns in (8, 10, 12):
        assert 210 + columns * (gallery_cell(columns) + 8) <= PAGE
    assert gallery_cell(40) == 64  # beyond that the gallery scrolls
