"""``vitlens report``: one self-contained HTML page from ``vitlens evaluate --out`` files.

Pictures are inline PNG data URIs and the style sheet is inline, so the page needs no network to view.
Several results files (several models, or the same model scored on different numbers of images) merge
into one page: a column per (model, method), each metric with the number of images it used.

Sections: what was run; the gallery (rows of images, columns of methods, ground-truth boxes and the
WSOL boxes at MaxBoxAcc's best threshold); what each map means; the B-cos colour explanations; the
metric table (each value with its 95 % bootstrap interval; the best method of a run marked where it is
significantly better, ties shown as ties); insertion / deletion and perturbation curves; the cost of
each method as a ratio to one forward pass; the per-class breakdown of the per-image metrics.
"""

from __future__ import annotations

import base64
import binascii
import html
import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from .._utils import require
from ..backbones import upsample
from ..errors import VitlensError
from ..io import atomic_write_text, check_output_file
from ..metrics import METRICS, boxes_from_map
from ..metrics.localisation import normalize_maps
from .colormaps import colormap
from .overlay import BACKGROUND, GT_COLOUR, PRED_COLOUR, font, on_background, overlay, plain, scale_for

CELL = 128  # pixels of a gallery picture's longer side (64 px inputs at twice their size)
PAGE = 1240  # pixels of the page's content width (main's 1,280 px less its padding)
CMAP = "inferno"
PALETTE = ("#4c9be8", "#f28e2b", "#59a14f", "#e15759", "#b07aa1", "#edc948", "#76b7b2", "#ff9da7", "#9c755f")

# How each display scale reads, after a method's one-sentence meaning.
SCALE_WORDS = {
    "probability": "absolute, 0–1",
    "signed": "signed, relative",
    "positive": "positive, relative",
    "minmax": "relative",
}
# The perturbation curves and the value each one tracks.
CURVES = {
    "deletion": ("probability", "patches removed, most relevant first"),
    "insertion": ("probability", "patches revealed, most relevant first"),
    "positive-perturbation": ("accuracy", "patches removed, most relevant first"),
    "negative-perturbation": ("accuracy", "patches removed, least relevant first"),
}

STYLE = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;margin:0;color:#1d1d22;
background:#f6f6f8}
main{max-width:1280px;margin:0 auto;padding:24px 28px 60px}
h1{font-size:26px;margin:0 0 4px}h2{font-size:20px;margin:36px 0 10px;border-bottom:1px solid #ddd;padding-bottom:4px}
.sub{color:#666;margin:0 0 12px}
table{border-collapse:collapse;background:#fff;font-size:14px}
th,td{border:1px solid #e2e2e6;padding:4px 8px;text-align:right;vertical-align:top}
th{background:#efeff3;font-weight:600}
td.l,th.l{text-align:left}
td.best{font-weight:700;background:#e4f4e4;white-space:nowrap}
.scroll{overflow-x:auto}.metrics th{font-size:12px;padding:4px 5px}.metrics td{padding:4px 6px}
td.best::after{content:" ★";color:#2f8a3a}
td.tie{background:#f0f7f0;white-space:nowrap}td.tie::after{content:" =";color:#2f8a3a}
.ci{display:block;font-size:10px;color:#777;font-weight:400;white-space:nowrap}
.metrics tr.group td{background:#eef1f6;font-size:13px}
.gallery{background:#18181c;color:#eee;border-collapse:separate;border-spacing:4px}
.gallery td,.gallery th{border:0;background:none;text-align:center;padding:2px;vertical-align:top}
.gallery th{font-size:13px}.gallery .model{display:block;color:#aaa;font-weight:400;font-size:11px}
.gallery img{display:block;width:{cell}px;height:auto;image-rendering:auto}
.gallery td.first{min-width:200px}
.gallery .lab{font-size:11px;line-height:1.35;color:#ccc;white-space:nowrap;margin:3px auto 0}
.gallery .lab b{font-size:13px;color:#fff}
td.m{white-space:nowrap}
.legend{display:flex;gap:22px;align-items:center;flex-wrap:wrap;font-size:13px;margin:8px 0}
.bar{display:inline-block;width:180px;height:12px;border-radius:2px;vertical-align:middle;margin:0 6px}
.box{display:inline-block;width:14px;height:10px;border:2px solid;vertical-align:middle;margin-right:4px}
.cost{display:inline-block;height:10px;background:#4c9be8;border-radius:2px;vertical-align:middle}
.note{color:#666;font-size:13px}
dl{background:#fff;padding:10px 16px;border:1px solid #e2e2e6}dt{font-weight:700}dd{margin:0 0 8px 0}
.pair{display:inline-block;margin:4px;text-align:center;font-size:12px;color:#ccc}
.pairs{background:#18181c;padding:8px}
.pairs img{width:{cell}px;display:inline-block}
"""


MAX_PICTURE_PIXELS = 1 << 22  # a gallery picture is one model input: at most 2048² pixels are decoded
MAX_GALLERY = 1000  # images in one results file's gallery
MAX_MAP_CELLS = 1 << 16  # cells of one gallery map (256²)


def _num(v: object, finite: bool = False) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and (not finite or math.isfinite(v))


def _int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _nums(v: object, finite: bool = False) -> bool:
    return isinstance(v, list) and all(_num(x, finite) for x in v)


def _box(b: object) -> bool:
    """``[x0, y0, x1, y1]``: finite, x0 <= x1 and y0 <= y1."""
    return _nums(b, True) and len(b) == 4 and b[0] <= b[2] and b[1] <= b[3]


def _map(v: object) -> bool:
    """A 2-D, rectangular, non-empty list of finite numbers, at most :data:`MAX_MAP_CELLS` cells."""
    if not (isinstance(v, list) and v and isinstance(v[0], list) and v[0] and len(v) * len(v[0]) <= MAX_MAP_CELLS):
        return False
    return all(_nums(r, True) and len(r) == len(v[0]) for r in v)


def picture_size(b64: object, where: str) -> tuple[int, int]:
    """(width, height) of a base64 PNG from its header alone; refuses a non-PNG or one over the pixel bound."""
    try:
        data = base64.b64decode(b64, validate=True) if isinstance(b64, str) else b""
        with Image.open(io.BytesIO(data), formats=["PNG"]) as im:  # reads the header, decodes nothing
            size = im.size
    except (binascii.Error, ValueError, OSError, Image.DecompressionBombError) as e:
        raise VitlensError(f"{where}: not a base64 PNG picture ({str(e)[:80] or type(e).__name__})") from None
    if size[0] * size[1] > MAX_PICTURE_PIXELS:
        raise VitlensError(f"{where}: picture too large ({size[0]}×{size[1]} pixels; at most {MAX_PICTURE_PIXELS})")
    return size


def check_results(data: object, where: str) -> dict:
    """Check a parsed results file field by field before any work (types, lengths, picture sizes).

    Args:
        data: the parsed JSON.
        where: the file, for the messages.

    Returns:
        ``data``, unchanged. A field of the wrong type raises :class:`VitlensError` naming it.
    """

    def need(ok: bool, key: str, expected: str) -> None:
        if not ok:
            raise VitlensError(f"{where}: invalid {key!r} (expected {expected})")

    need(isinstance(data, dict), "(top level)", "a JSON object written by `vitlens evaluate --out`")
    assert isinstance(data, dict)
    if "format" in data:
        need(data["format"] == "vitlens-results", "format", "'vitlens-results'")
    need(isinstance(data.get("model"), str), "model", "a string")
    need(isinstance(data.get("data"), str), "data", "a string")
    need(_int(data.get("n")), "n", "an integer >= 0")
    need(data.get("accuracy") is None or _num(data["accuracy"]), "accuracy", "a number or null")
    results = data.get("results")
    need(isinstance(results, dict) and all(isinstance(v, dict) for v in results.values()), "results",
         "an object of methods, each an object of metric values")  # fmt: skip
    for method, values in results.items():
        need(all(v is None or _num(v) for v in values.values()), f"results.{method}", "numbers or null")
    need(isinstance(data.get("used", {}), dict) and all(map(_int, data.get("used", {}).values())), "used",
         "an object of image counts")  # fmt: skip
    need(
        data.get("classes") is None
        or (isinstance(data["classes"], list) and all(isinstance(c, str) for c in data["classes"])),
        "classes",
        "class names",
    )
    for key in ("settings", "versions"):
        need(data.get(key) is None or isinstance(data[key], dict), key, "an object")
    for key in ("device", "threads", "date"):
        need(data.get(key) is None or isinstance(data[key], str | int) and not isinstance(data[key], bool), key,
             "a string")  # fmt: skip
    cost = data.get("cost")
    need(cost is None or (isinstance(cost, dict) and isinstance(cost.get("methods", {}), dict)), "cost", "an object")
    for method, c in ((cost or {}).get("methods") or {}).items():
        need(isinstance(c, dict) and _num(c.get("seconds_per_image"), True) and
             (c.get("ratio_to_forward") is None or _num(c["ratio_to_forward"], True) and c["ratio_to_forward"] >= 0),
             f"cost.methods.{method}", "seconds_per_image and ratio_to_forward numbers")  # fmt: skip
    curves = data.get("curves")
    need(curves is None or (isinstance(curves, dict) and all(isinstance(v, dict) for v in curves.values())),
         "curves", "an object of methods")  # fmt: skip
    for method, per_metric in (curves or {}).items():
        for metric, c in per_metric.items():
            key = f"curves.{method}.{metric}"
            need(isinstance(c, dict), key, "an object")
            if metric in CURVES and c:
                quantity = CURVES[metric][0]
                need(_nums(c.get("fraction")) and _nums(c.get(quantity)) and len(c["fraction"]) == len(c[quantity]),
                     key, f"lists 'fraction' and '{quantity}' of equal length")  # fmt: skip
            elif metric == "maxboxacc" and c:
                need(_nums(c.get("threshold")) and isinstance(c.get("accuracy"), list) and c["accuracy"]
                     and _nums(c["accuracy"][0]) and len(c["accuracy"][0]) == len(c["threshold"])
                     and _nums(c.get("best_threshold")) and c["best_threshold"],
                     key, "'threshold', 'accuracy' and 'best_threshold' lists")  # fmt: skip
            elif metric == "sanity" and c:
                need(
                    isinstance(c.get("levels"), list)
                    and _nums(c.get("spearman"))
                    and len(c["levels"]) == len(c["spearman"]),
                    key,
                    "lists 'levels' and 'spearman' of equal length",
                )
    images = data.get("images")
    need(images is None or isinstance(images, dict), "images", "an object of per-image lists")
    if images:
        index = images.get("index")
        need(isinstance(index, list) and all(map(_int, index)), "images.index", "a list of image indices")
        for key in ("label", "predicted"):
            value = images.get(key)
            need(value is None or (isinstance(value, list) and len(value) == len(index) and all(map(_int, value))),
                 f"images.{key}", f"a list of {len(index)} class indices")  # fmt: skip
    per_image = data.get("per_image")
    need(per_image is None or (isinstance(per_image, dict) and all(isinstance(v, dict) for v in per_image.values())),
         "per_image", "an object of methods, each an object of metrics")  # fmt: skip
    for method, metrics in (per_image or {}).items():
        for metric, record in metrics.items():
            key = f"per_image.{method}.{metric}"
            need(isinstance(record, dict), key, "an object of equal-length lists")
            index = record.get("index")
            need(index is None or (isinstance(index, list) and all(map(_int, index))), f"{key}.index",
                 "a list of image indices")  # fmt: skip
            for name, values in record.items():
                need(isinstance(values, list) and (index is None or len(values) == len(index)), f"{key}.{name}",
                     "a list as long as its index")  # fmt: skip
                if name != "index":
                    need(all(v is None or _num(v) or isinstance(v, list) for v in values), f"{key}.{name}",
                         "numbers or null")  # fmt: skip
    intervals = data.get("intervals")
    need(intervals is None or (isinstance(intervals, dict) and all(isinstance(v, dict) for v in intervals.values())),
         "intervals", "an object of methods")  # fmt: skip
    for method, per_key in (intervals or {}).items():
        for key, pair in per_key.items():
            ok = pair is None or (isinstance(pair, list) and len(pair) == 2 and all(v is None or _num(v) for v in pair))
            need(ok, f"intervals.{method}.{key}", "[low, high]")
    best = data.get("best")
    need(best is None or isinstance(best, dict), "best", "an object of metrics")
    for key, b in (best or {}).items():
        need(isinstance(b, dict) and isinstance(b.get("best", []), list)
             and all(isinstance(m, str) for m in b.get("best", [])) and isinstance(b.get("significant", False), bool),
             f"best.{key}", "an object with 'best' (method names) and 'significant' (true or false)")  # fmt: skip
    gallery = data.get("gallery")
    need(gallery is None or isinstance(gallery, dict), "gallery", "an object or null")
    if gallery:
        index = gallery.get("index")
        need(isinstance(index, list) and len(index) <= MAX_GALLERY and all(map(_int, index)), "gallery.index",
             f"a list of at most {MAX_GALLERY} image indices")  # fmt: skip
        k = len(index)
        lists = {"image": lambda v: isinstance(v, str), "label": _int, "predicted": _int,
                 "probability": lambda v: _num(v, True),
                 "boxes": lambda v: isinstance(v, list) and all(_box(b) for b in v)}  # fmt: skip
        for key, check in lists.items():
            value = gallery.get(key)
            need(isinstance(value, list) and len(value) == k and all(map(check, value)), f"gallery.{key}",
                 f"a list of {k} valid entries")  # fmt: skip
        maps = gallery.get("maps")
        need(isinstance(maps, dict), "gallery.maps", "an object of methods")
        for method, m in maps.items():
            need(isinstance(m, list) and len(m) == k and all(map(_map, m)), f"gallery.maps.{method}",
                 f"{k} rectangular maps of finite numbers, at most {MAX_MAP_CELLS} cells each")  # fmt: skip
        pictures = gallery.get("pictures") or {}
        need(isinstance(pictures, dict) and all(isinstance(p, dict) for p in pictures.values()), "gallery.pictures",
             "an object of methods")  # fmt: skip
        for i, b64 in enumerate(gallery["image"]):
            picture_size(b64, f"{where}: gallery.image[{i}]")
        for method, named in pictures.items():
            for name, values in named.items():
                need(isinstance(values, list) and len(values) == k, f"gallery.pictures.{method}.{name}",
                     f"a list of {k} pictures")  # fmt: skip
                for i, b64 in enumerate(values):
                    picture_size(b64, f"{where}: gallery.pictures.{method}.{name}[{i}]")
    return data


def load_results(path: str | os.PathLike) -> dict:
    """A ``vitlens evaluate --out`` file, checked (:func:`check_results`) to have what the report needs."""
    if os.path.exists(path) and not os.path.isdir(path) and not os.path.isfile(path):
        raise VitlensError(f"results file {os.fspath(path)!r} is not a regular file")  # a FIFO would block
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise VitlensError(f"results file {os.fspath(path)!r} not found") from None
    except IsADirectoryError:
        raise VitlensError(f"results file {os.fspath(path)!r} is a directory") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise VitlensError(f"cannot read results file {os.fspath(path)!r}: {first}") from None
    if not isinstance(data, dict) or not isinstance(data.get("results"), dict) or "model" not in data:
        raise VitlensError(f"{os.fspath(path)!r} is not a `vitlens evaluate --out` results file")
    return check_results(data, repr(os.fspath(path)))


# --- merging results files into columns -------------------------------------------------------------


def short(model: str) -> str:
    """A checkpoint path's last part, a URI (``timm:…``, ``hf:org/name``) as it is."""
    if ":" in model.split("/")[0]:
        return model
    return Path(model).name or model


@dataclass
class Column:
    """One (model, method) of the report, merged over every results file that scored it."""

    method: str
    model: str
    label: str = ""
    results: dict = field(default_factory=dict)
    used: dict = field(default_factory=dict)  # metric → images (or cells) it used
    curves: dict = field(default_factory=dict)
    cost: dict | None = None
    cost_n: int = 0
    run: dict | None = None  # the results file whose gallery the column shows
    intervals: dict = field(default_factory=dict)  # key → [lo, hi], the 95 % bootstrap interval
    marks: dict | None = None  # key → "best" / "tie" within its run (None: results without a bootstrap)
    accuracy: float | None = None  # the model's accuracy on the run's images


def columns_of(runs: list[dict]) -> list[Column]:
    cols: dict[tuple[str, str], Column] = {}
    for run in runs:
        for method, values in run["results"].items():
            col = cols.setdefault((run["model"], method), Column(method, run["model"]))
            if col.accuracy is None and isinstance(run.get("accuracy"), int | float):
                col.accuracy = float(run["accuracy"])
            col.results.update(values)
            col.used.update(run.get("used", {}))
            col.curves.update((run.get("curves") or {}).get(method, {}))
            add_uncertainty(col, run)
            cost = (run.get("cost") or {}).get("methods", {}).get(method)
            if cost is not None and run["n"] > col.cost_n:
                col.cost, col.cost_n = cost, run["n"]
            if col.run is None and method in ((run.get("gallery") or {}).get("maps") or {}):
                col.run = run
    models = {}
    for model, method in cols:
        models.setdefault(method, set()).add(model)
    for (model, method), col in cols.items():
        col.label = method if len(models[method]) == 1 else f"{method} · {short(model)}"
    order = list(dict.fromkeys(model for model, _ in cols))  # grouped by model, in the order the runs name them
    return sorted(cols.values(), key=lambda c: order.index(c.model))


def direction(key: str) -> int:
    """How a metric key ranks methods: 1 higher is better, −1 lower is better, 0 not ranked."""
    base = key.split("/")[0]
    return METRICS[base]().direction(key) if base in METRICS else 0


# --- pictures -----------------------------------------------------------------------------------------


def data_uri(picture: Image.Image) -> str:
    buf = io.BytesIO()
    picture.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def decode_png(b64: str) -> Image.Image:
    """A base64 PNG as an RGBA image; its size is checked from the header before anything is decoded."""
    picture_size(b64, "gallery picture")
    try:
        with Image.open(io.BytesIO(base64.b64decode(b64)), formats=["PNG"]) as im:
            return im.convert("RGBA")
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise VitlensError(f"gallery picture: cannot decode ({str(e)[:80] or type(e).__name__})") from None


def image_tensor(b64: str) -> torch.Tensor:
    return torch.from_numpy(np.array(decode_png(b64).convert("RGB"))).permute(2, 0, 1).float() / 255


def wsol_box(heat: torch.Tensor, size: tuple[int, int], threshold: float) -> list[list[int]]:
    """The box MaxBoxAcc scores: the largest component of the min-max normalised map at ``threshold``."""
    pixels = normalize_maps(upsample(heat[None].float(), size))[0]
    return boxes_from_map(pixels, threshold)[:1].tolist()


def best_threshold(col: Column) -> float | None:
    best = col.curves.get("maxboxacc", {}).get("best_threshold")
    return float(best[0]) if best else None


@dataclass
class GalleryRow:
    key: tuple[str, int]  # (data, index)
    image: torch.Tensor
    label: int
    boxes: list
    classes: list
    predictions: dict = field(default_factory=dict)  # model → (class, probability)
    cells: dict = field(default_factory=dict)  # column label → picture
    colour: dict = field(default_factory=dict)  # column label → B-cos colour picture


def gallery_rows(cols: list[Column]) -> list[GalleryRow]:
    """Every gallery image of the results, with each column's overlay (and colour explanation)."""
    rows: dict[tuple[str, int], GalleryRow] = {}
    for col in cols:
        if col.run is None:
            continue
        g, classes = col.run["gallery"], col.run.get("classes") or []
        thr = best_threshold(col)
        for i, index in enumerate(g["index"]):
            key = (col.run["data"], index)
            if key not in rows:
                rows[key] = GalleryRow(key, image_tensor(g["image"][i]), g["label"][i], g["boxes"][i], classes)
            row = rows[key]
            row.predictions[short(col.model)] = (g["predicted"][i], g["probability"][i])
            heat = torch.tensor(g["maps"][col.method][i])
            size = tuple(row.image.shape[-2:])
            pred = wsol_box(heat, size, thr) if thr is not None else []
            row.cells[col.label] = overlay(
                row.image, heat, boxes=row.boxes, pred_boxes=pred, size=CELL, scale=scale_for(col.method)
            )
            colour = (g.get("pictures") or {}).get(col.method, {}).get("bcos-colour")
            if colour:
                row.colour[col.label] = on_background(decode_png(colour[i]).resize(row.cells[col.label].size))
    return list(rows.values())


def class_name(classes: list, k: int) -> str:
    return str(classes[k]) if 0 <= k < len(classes) else str(k)


def gallery_sheet(cols: list[Column], rows: list[GalleryRow]) -> Image.Image:
    """The gallery as one picture (for a README): a header row of method names, a row per image."""
    labels = [c.label for c in cols if c.run is not None]
    head, side = 26, 4
    width = side + (len(labels) + 1) * (CELL + side)
    sheet = Image.new("RGB", (width, head + len(rows) * (CELL + side) + side), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    f = font(14)
    for j, text in enumerate(["image", *labels]):
        draw.text(
            (side + j * (CELL + side) + CELL // 2, head // 2 + 2), text, fill=(235, 235, 235), font=f, anchor="mm"
        )
    for i, row in enumerate(rows):
        y = head + i * (CELL + side)
        pics = [plain(row.image, boxes=row.boxes, size=CELL), *(row.cells.get(label) for label in labels)]
        for j, pic in enumerate(pics):
            if pic is not None:
                sheet.paste(pic, (side + j * (CELL + side), y))
        name = class_name(row.classes, row.label)
        draw.text((side + 4, y + CELL - 4), name, fill=(255, 255, 255), font=font(13), anchor="ld", stroke_width=2,
                  stroke_fill=(0, 0, 0))  # fmt: skip
    return sheet


def figure_uri(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def curves_figure(cols: list[Column]) -> str | None:
    """Mean perturbation curves (and, when scored, box accuracy over thresholds and the sanity check's
    rank correlation per randomised level) as one PNG data URI; ``None`` when there are none."""
    matplotlib = require("matplotlib", extra="viz", what="the report's curves")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [k for k in (*CURVES, "maxboxacc", "sanity") if any(col.curves.get(k) for col in cols)]
    if not panels:
        return None
    ncols = min(3, len(panels))
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.3 * ncols, 3.3 * nrows), squeeze=False)
    colour = {col.label: PALETTE[i % len(PALETTE)] for i, col in enumerate(cols)}
    for ax, key in zip(axes.flat, panels, strict=False):
        arrow = "↑" if METRICS[key].higher_is_better else "↓"
        for col in cols:
            c = col.curves.get(key)
            if not c:
                continue
            value = col.results.get(key)  # the area under the curve, or the best point
            name = f"{col.label} ({value:.3f})" if isinstance(value, float) else col.label
            if key in CURVES:
                quantity, xlabel = CURVES[key]
                ylabel = "probability of the class" if quantity == "probability" else "top-1 accuracy"
                x, y = c["fraction"], c[quantity]
            elif key == "maxboxacc":
                x, y, xlabel, ylabel = c["threshold"], c["accuracy"][0], "threshold τ", "box accuracy (IoU ≥ 0.5)"
            else:
                x, y, xlabel, ylabel = range(len(c["levels"])), c["spearman"], "randomised from the top", "rank corr."
                ax.set_xticks(list(x), c["levels"], rotation=45, fontsize=7)
            ax.plot(x, y, color=colour[col.label], lw=1.8, label=name)
        ax.set_title(f"{key} {arrow}", fontsize=11)
        ax.set_xlabel(xlabel, fontsize=9)
        ax.set_ylabel(ylabel, fontsize=9)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
        ax.legend(fontsize=7, frameon=False)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.tight_layout()
    return figure_uri(fig)


# --- HTML -------------------------------------------------------------------------------------------


def esc(value) -> str:
    return html.escape(str(value))


def fmt(v) -> str:
    return "—" if v is None else f"{v:.3f}" if isinstance(v, float) else esc(v)


def colour_bar() -> str:
    stops = ", ".join("#{:02x}{:02x}{:02x}".format(*c) for c in colormap(CMAP)[np.minimum(np.arange(9) * 32, 255)])
    return f'<span class="bar" style="background:linear-gradient(to right,{stops})"></span>'


def section_run(runs: list[dict]) -> str:
    rows = []
    for r in runs:
        s = r.get("settings") or {}
        metrics = ", ".join(f"{k} ({n})" for k, n in r.get("used", {}).items())
        rows.append(
            f"<tr><td class=l>{esc(r['model'])}</td><td class=l>{esc(r['data'])}</td><td>{esc(r['n'])}</td>"
            f"<td>{fmt(r.get('accuracy'))}</td><td class=l>{esc(s.get('target', '—'))}</td>"
            f"<td class=l>{esc(', '.join(r['results']))}</td><td class=l>{esc(metrics)}</td>"
            f"<td class=l>{esc(r.get('device', '—'))}, {esc(r.get('threads', '?'))} threads</td>"
            f"<td class=l>{esc(r.get('date', '—'))}</td></tr>"
        )
    versions = sorted({", ".join(f"{k} {v}" for k, v in (r.get("versions") or {}).items()) for r in runs} - {""})
    return (
        '<section id="run"><h2>What was run</h2><table><tr><th class=l>model</th><th class=l>data</th><th>n</th>'
        "<th>accuracy</th><th class=l>explained class</th><th class=l>methods</th><th class=l>metrics (images used)"
        "</th><th class=l>device</th><th class=l>date</th></tr>" + "".join(rows) + "</table>"
        + "".join(f'<p class="note">versions: {esc(v)}</p>' for v in versions)
        + "</section>"
    )  # fmt: skip


def section_gallery(cols: list[Column], rows: list[GalleryRow]) -> str:
    shown = [c for c in cols if c.run is not None]
    if not rows:
        return (
            '<section id="gallery"><h2>Gallery</h2><p class="note">These results carry no gallery (run '
            "<code>vitlens evaluate --out FILE</code> with <code>--gallery N</code>, N &gt; 0).</p></section>"
        )
    thresholds = ", ".join(f"{c.label} τ={best_threshold(c):.2f}" for c in shown if best_threshold(c) is not None)
    head = "".join(f'<th>{esc(c.method)}<span class="model">{esc(short(c.model))}</span></th>' for c in shown)
    body = []
    for row in rows:
        preds = "<br>".join(
            f"{esc(m) if len(row.predictions) > 1 else 'predicted'}: {esc(class_name(row.classes, k))} {p:.2f}"
            f"{' ✓' if k == row.label else ' ✗'}"
            for m, (k, p) in row.predictions.items()
        )
        first = (
            f'<td class="first"><img alt="image {esc(row.key[1])}" style="margin:0 auto" '
            f'src="{data_uri(plain(row.image, boxes=row.boxes, size=CELL))}"><div class="lab">'
            f"<b>{esc(class_name(row.classes, row.label))}</b> · #{esc(row.key[1])}<br>{preds}</div></td>"
        )
        cells = "".join(
            f'<td><img alt="{esc(c.label)}" src="{data_uri(row.cells[c.label])}"></td>' if c.label in row.cells
            else "<td>—</td>"
            for c in shown
        )  # fmt: skip
        body.append(f"<tr>{first}{cells}</tr>")
    legend = (
        f'<div class="legend"><span>map: low{colour_bar()}high</span>'
        f'<span><span class="box" style="border-color:rgb{GT_COLOUR}"></span>ground-truth box</span>'
        f'<span><span class="box" style="border-color:rgb{PRED_COLOUR}"></span>WSOL box (largest component of the '
        f"map at MaxBoxAcc's best threshold over the data set{': ' + esc(thresholds) if thresholds else ''})</span>"
        "</div>"
    )
    note = (
        '<p class="note">Each map explains the class the evaluation explained (its <i>explained class</i>). '
        "PM and DiffMask maps are probabilities shown on their absolute scale (0 → 1); B-cos maps show the "
        "positive contributions relative to the largest; the other maps are min-max normalised per image.</p>"
    )
    fit = f"<style>.gallery img{{width:{gallery_cell(len(shown))}px}}</style>"
    return (
        f'<section id="gallery"><h2>Gallery</h2>{legend}{note}{fit}<div style="overflow-x:auto"><table class="gallery">'
        f"<tr><th>image</th>{head}</tr>" + "".join(body) + "</table></div></section>"
    )


def gallery_cell(columns: int) -> int:
    """Display width of a gallery picture: :data:`CELL`, smaller (down to 64 px) so that the image column and
    ``columns`` method columns fit the page; beyond that the gallery scrolls sideways."""
    return max(64, min(CELL, (PAGE - 210) // max(1, columns) - 8))


def method_meaning(method: str) -> str:
    """One sentence on a method's map, from the explainer's own ``meaning``, ``scale`` and ``paper``."""
    from ..explainers import EXPLAINERS

    if method not in EXPLAINERS:
        return "Relative relevance."
    cls = EXPLAINERS[method]
    text = cls.meaning[:1].upper() + cls.meaning[1:]
    return f"{text}. Values: {SCALE_WORDS.get(cls.scale, 'relative')}. Source: {cls.paper}."


def section_meanings(cols: list[Column]) -> str:
    items = [f"<dt>{esc(m)}</dt><dd>{esc(method_meaning(m))}</dd>" for m in dict.fromkeys(c.method for c in cols)]
    return '<section id="meanings"><h2>What each map means</h2><dl>' + "".join(items) + "</dl></section>"


def section_bcos(cols: list[Column], rows: list[GalleryRow]) -> str:
    labels = [c.label for c in cols if any(c.label in r.colour for r in rows)]
    if not labels:
        return (
            '<section id="bcos"><h2>B-cos colour explanations</h2><p class="note">No B-cos model among these '
            "results: train one with <code>vitlens train bcos</code> and evaluate it with the method "
            "<code>bcos</code>.</p></section>"
        )
    pairs = []
    for row in rows:
        for label in labels:
            if label in row.colour:
                pairs.append(
                    f'<span class="pair"><img alt="image" src="{data_uri(plain(row.image, size=CELL))}">'
                    f'<img alt="B-cos colour explanation" src="{data_uri(row.colour[label])}"><br>'
                    f"{esc(class_name(row.classes, row.label))} · {esc(label)}</span>"
                )
    return (
        '<section id="bcos"><h2>B-cos colour explanations</h2><p class="note">Per pixel, the colour the '
        "dynamic linear weights W(x) align with (the angle of their six input channels r, g, b, 1−r, 1−g, "
        "1−b), shown where the contribution W(x)·x to the class logit is positive, with opacity from the "
        'weights\' norm (Böhle et al. 2024).</p><div class="pairs">' + "".join(pairs) + "</div></section>"
    )


def metric_keys(cols: list[Column]) -> list[str]:
    return list(dict.fromkeys(k for c in cols for k in c.results))


def best_values(cols: list[Column], key: str) -> set[str]:
    """Labels of the columns holding the best value of ``key`` (ties all marked)."""
    values = {c.label: c.results.get(key) for c in cols if isinstance(c.results.get(key), int | float)}
    if len(values) < 2:
        return set()
    sign = direction(key)
    if not sign:
        return set()
    best = max(values.values()) if sign > 0 else min(values.values())
    return {label for label, v in values.items() if np.isclose(v, best, rtol=0, atol=1e-12)}


def metric_table(cols: list[Column], keys: list[str]) -> str:
    def head(key: str) -> str:
        base = key.split("/")[0]
        arrow = {1: " ↑", -1: " ↓"}.get(direction(key), "")
        ns = sorted({c.used[base] for c in cols if base in c.used and key in c.results})
        n = "" if not ns else f"n = {ns[0]}" if len(ns) == 1 else f"n = {ns[0]}–{ns[-1]}"
        return f'<th>{esc(key)}{arrow}<span class="note" style="display:block;font-weight:400">{esc(n)}</span></th>'

    best = {k: best_values(cols, k) for k in keys}
    rows = []
    grouped = len({c.model for c in cols}) > 1
    for i, c in enumerate(cols):
        if grouped and (i == 0 or cols[i - 1].model != c.model):
            acc = "" if c.accuracy is None else f" · accuracy {c.accuracy:.3f}"
            rows.append(
                f"<tr class=group><td class=l colspan={len(keys) + 1}><b>{esc(short(c.model))}</b>{acc}</td></tr>"
            )
        cells = "".join(metric_cell(c, k, best[k]) for k in keys)
        name = f"<b>{esc(c.method)}</b><br><span class=note>{esc(short(c.model))}</span>"
        rows.append(f"<tr><td class='l m'>{name}</td>{cells}</tr>")
    heads = "".join(head(k) for k in keys)
    body = "".join(rows)
    return f'<div class="scroll"><table class="metrics"><tr><th class=l>method</th>{heads}</tr>{body}</table></div>'


def section_metrics(cols: list[Column]) -> str:
    keys = metric_keys(cols)
    main = [k for k in keys if "/" not in k]
    detail = [k for k in keys if "/" in k]
    out = (
        '<section id="metrics"><h2>Metrics</h2><p class="note">↑ higher is better, ↓ lower is better; n = the images '
        "(grid cells for the grid pointing game) each metric used; methods are grouped by model, with its accuracy. "
        "Values are fractions in [0, 1], except the areas over step indices of protocol diffmask. "
        + MARKS_NOTE
        + "</p>"
        + metric_table(cols, main)
    )
    if detail:
        out += "<details><summary>all values</summary>" + metric_table(cols, keys) + "</details>"
    return out + "</section>"


def section_curves(cols: list[Column]) -> str:
    uri = curves_figure(cols)
    body = (
        f'<img alt="curves" style="max-width:100%" src="{uri}"><p class="note">Mean curves over the images each '
        "metric used; legend values are the areas under the curves (the metric's value).</p>"
        if uri
        else '<p class="note">No curves in these results (the perturbation metrics were not run).</p>'
    )
    return f'<section id="curves"><h2>Curves</h2>{body}</section>'


def spread(cost: dict) -> str:
    """``p10–p90× (N batches)`` of a method's per-batch cost ratios, ``—`` without two batches."""
    band = cost.get("ratio_p10_p90")
    if not (isinstance(band, list) and len(band) == 2 and all(_num(v, finite=True) for v in band)):
        return "—"
    return f"{band[0]:.2f}–{band[1]:.2f}× ({int(cost.get('batches', 0))} batches)"


def section_cost(cols: list[Column], runs: list[dict]) -> str:
    costed = [c for c in cols if c.cost and c.cost.get("ratio_to_forward") is not None]
    if not costed:
        return '<section id="cost"><h2>Cost</h2><p class="note">No cost in these results.</p></section>'
    top = max(1e-12, *(c.cost["ratio_to_forward"] for c in costed))
    rows = "".join(
        f"<tr><td class='l m'><b>{esc(c.method)}</b> <span class=note>{esc(short(c.model))}</span></td>"
        f"<td>{c.cost['seconds_per_image'] * 1000:.2f}</td><td>{c.cost['ratio_to_forward']:.2f}×</td>"
        f"<td class=note>{esc(spread(c.cost))}</td>"
        f'<td class=l><span class="cost" style="width:{max(2, round(240 * c.cost["ratio_to_forward"] / top))}px">'
        "</span></td></tr>"
        for c in costed
    )
    devices = ", ".join(sorted({f"{r.get('device', '?')} ({r.get('threads', '?')} threads)" for r in runs}))
    return (
        '<section id="cost"><h2>Cost</h2><table><tr><th class=l>method</th><th>ms / image</th>'
        f'<th>× one forward</th><th>per batch</th><th class=l></th></tr>{rows}</table><p class="note">Time to '
        "compute the maps, measured inside <code>vitlens evaluate</code> over the evaluated batches (the first one, "
        "a warm-up, left out when there are more), as a ratio to one plain "
        f"forward pass of the same batches ({esc(devices)}). <i>Per batch</i>: the 10th–90th percentile of each "
        "batch's ratio, the noise of these figures; a ratio below 1 for a method that needs a forward pass is "
        "noise (other work on the machine, caches). Compare ratios, not absolute times; "
        "<code>vitlens bench</code> measures them with repeats.</p></section>"
    )


# --- uncertainty, ties and the per-class view -------------------------------------------------------

MARKS_NOTE = (
    "Under each value its 95 % bootstrap interval over images. ★ marks the best method of a run (one model, "
    "one results file) where its paired bootstrap difference to every other method of that run is significant; "
    "= marks methods tied for best (not significantly different). Methods of different runs are not ranked "
    "against each other."
)


def add_uncertainty(col: Column, run: dict) -> None:
    """Merge a run's intervals and its best / tied marks for ``col``'s method into the column."""
    col.intervals.update((run.get("intervals") or {}).get(col.method, {}))
    if "best" not in run:  # results written before the bootstrap
        return
    col.marks = col.marks or {}
    for key, b in run["best"].items():
        if col.method in b.get("best", []):
            col.marks[key] = "best" if b.get("significant") else "tie"


def metric_cell(col: Column, key: str, best: set[str]) -> str:
    """One value of the metric table with its interval; ★ best where significant, = tied for best. Results
    without a bootstrap fall back to the best value of the column (ties shown as ties)."""
    if col.marks is not None:
        mark = col.marks.get(key)
    else:
        mark = None if col.label not in best else "best" if len(best) == 1 else "tie"
    value = col.results.get(key)
    ci = col.intervals.get(key)
    interval = f'<span class="ci">[{ci[0]:.3f}, {ci[1]:.3f}]</span>' if ci and value is not None else ""
    cls = {"best": " class=best", "tie": " class=tie"}.get(mark, "")
    return f"<td{cls}>{fmt(value)}{interval}</td>"


# metric → (per-image record, how an image scores): the values the per-class view averages
PER_CLASS = {
    "pointing-game": ("hit", "hit rate"),
    "energy-pointing-game": ("share", "energy share"),
    "maxboxacc": ("iou", "IoU ≥ 0.5 at the best threshold"),
    "deletion": ("probability", "deletion AUC"),
    "insertion": ("probability", "insertion AUC"),
    "positive-perturbation": ("accuracy", "accuracy AUC"),
    "negative-perturbation": ("accuracy", "accuracy AUC"),
}


def per_class_values(run: dict, method: str, metric: str) -> dict[int, tuple[float, int]]:
    """Mean per-image value of ``metric`` per ground-truth class ``{class: (mean, images)}``."""
    images = run.get("images") or {}
    per = ((run.get("per_image") or {}).get(method) or {}).get(metric) or {}
    record = PER_CLASS[metric][0]
    if not images or record not in per:
        return {}
    label = dict(zip(images["index"], images["label"], strict=True))
    values: dict[int, list[float]] = {}
    for i, v in zip(per["index"], per[record], strict=True):
        if v is not None and i in label:
            values.setdefault(label[i], []).append(float(v >= 0.5) if metric == "maxboxacc" else float(v))
    return {k: (float(np.mean(v)), len(v)) for k, v in sorted(values.items())}


def verdict_lines(run: dict) -> list[str]:
    """Plain sentences for one run: the significant winner of each main metric, the ties, the sanity verdicts."""
    lines = []
    model = short(run["model"])
    acc = run.get("accuracy")
    head = esc(
        f"{model} ({'accuracy ' + format(acc, '.3f') if isinstance(acc, float) else 'no single-label accuracy'})"
    )
    wins, ties = {}, {}
    for key, b in (run.get("best") or {}).items():
        if "/" in key:
            continue
        (wins if b.get("significant") else ties).setdefault(", ".join(b.get("best", [])), []).append(key)
    for methods, keys in wins.items():
        lines.append(f"{head}: <b>{esc(methods)}</b> is best on {esc(', '.join(keys))} (significant, paired).")
    for methods, keys in ties.items():
        lines.append(f"{head}: {esc(methods)} tie for best on {esc(', '.join(keys))} (differences not significant).")
    for method, values in run["results"].items():
        verdict = values.get("sanity/pass", "missing")
        if verdict == "missing":
            continue
        word = {1.0: "passes", 0.0: "<b>fails</b>"}.get(verdict, "is undecided on")
        full = values.get("sanity/full")
        detail = f" (rank correlation {full:.2f} with every parameter randomised)" if isinstance(full, float) else ""
        lines.append(f"{head}: {esc(method)} {word} the sanity check{detail}.")
    return lines


def section_verdict(runs: list[dict]) -> str:
    """The first screen: which method does best at what on each model, and which fail the sanity check."""
    lines = [line for run in runs for line in verdict_lines(run)]
    if not lines:
        body = '<p class="note">No paired bootstrap in these results (one method per run, or older files).</p>'
    else:
        body = "<ul>" + "".join(f"<li>{line}</li>" for line in lines) + "</ul>"
    return f'<section id="verdict"><h2>Verdict</h2>{body}</section>'


def section_per_class(runs: list[dict]) -> str:
    """Per-class breakdown of the per-image metrics: one table per run and metric (classes × methods)."""
    parts = []
    for run in runs:
        classes = run.get("classes") or []
        for metric in PER_CLASS:
            methods = [m for m in run["results"] if per_class_values(run, m, metric)]
            if not methods:
                continue
            table = {m: per_class_values(run, m, metric) for m in methods}
            labels = sorted({k for t in table.values() for k in t})
            heads = "".join(f"<th>{esc(m)}</th>" for m in methods)
            rows = "".join(
                f"<tr><td class=l>{esc(classes[k] if k < len(classes) else k)}</td><td>{table[methods[0]][k][1]}</td>"
                + "".join(f"<td>{fmt(table[m][k][0]) if k in table[m] else '—'}</td>" for m in methods)
                + "</tr>"
                for k in labels
            )
            arrow = "↑" if METRICS[metric].higher_is_better else "↓"
            parts.append(
                f"<details><summary>{esc(metric)} {arrow} · {esc(short(run['model']))} "
                f"<span class=note>({esc(PER_CLASS[metric][1])} per image)</span></summary>"
                f"<table><tr><th class=l>class</th><th>n</th>{heads}</tr>{rows}</table></details>"
            )
    if not parts:
        body = '<p class="note">No per-image values with classes in these results.</p>'
    else:
        body = '<p class="note">Mean per-image value by ground-truth class.</p>' + "".join(parts)
    return f'<section id="per-class"><h2>Per class</h2>{body}</section>'


def build_report(runs: list[dict], title: str = "vitlens report") -> tuple[str, Image.Image | None]:
    """(the HTML page, the gallery as one picture or ``None``) for a list of loaded results files."""
    if not runs:
        raise VitlensError("no results to report")
    cols = columns_of(runs)
    rows = gallery_rows(cols)
    models = ", ".join(dict.fromkeys(short(r["model"]) for r in runs))
    data = ", ".join(dict.fromkeys(r["data"] for r in runs))
    style = STYLE.replace("{cell}", str(CELL))
    page = (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
        f'<meta name="viewport" content="width=device-width,initial-scale=1"><style>{style}</style></head><body><main>'
        f'<h1>{esc(title)}</h1><p class="sub">{esc(models)} on {esc(data)}</p>'
        + section_verdict(runs)
        + section_run(runs)
        + section_gallery(cols, rows)
        + section_meanings(cols)
        + section_bcos(cols, rows)
        + section_metrics(cols)
        + section_curves(cols)
        + section_cost(cols, runs)
        + section_per_class(runs)
        + "</main></body></html>\n"
    )
    return page, gallery_sheet(cols, rows) if rows else None


def write_report(
    results: list[str | os.PathLike], out: str | os.PathLike = "report.html", title: str = "vitlens report"
) -> Path:
    """Read ``vitlens evaluate --out`` files and write the self-contained report to ``out`` (atomically)."""
    if Path(out).is_dir():
        raise VitlensError(f"report output {os.fspath(out)} is a directory (give the HTML file to write)")
    check_output_file(out, "report output")  # refused before the work, not after it
    page, _ = build_report([load_results(p) for p in results], title)
    return atomic_write_text(out, page)
