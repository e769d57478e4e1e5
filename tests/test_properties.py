"""Property-based tests (hypothesis): the data-spec and model-URI parsers, and image loading.

Parsers: any text either parses into something valid or raises a one-line :class:`VitlensError` (never
another exception); every well-formed spec or URI parses back into exactly what it was built from.
Images: every mode, size and EXIF orientation loads as the independent numpy computation says.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from vitlens import VitlensError
from vitlens.data import BOUNDS, DATASET_BOUNDS, DATASETS, SPLITS, DataSpec, parse_data_spec
from vitlens.data.counting import COLOURS
from vitlens.data.images import load_image, read_image
from vitlens.models import SCHEMES, parse_model_uri
from vitlens.options import parse_value

# --- data specs ---------------------------------------------------------------------------------

SYNTHETIC = [n for n in DATASETS if n != "folder"]


def _bounds(name: str, key: str) -> tuple[int, int | None]:
    return DATASET_BOUNDS.get(name, {}).get(key, BOUNDS.get(key, (0, None)))


@st.composite
def data_specs(draw) -> tuple[str, str, str, dict]:
    """(spec text, name, split, options) of a well-formed spec with in-range values."""
    name = draw(st.sampled_from(SYNTHETIC))
    keys = draw(st.lists(st.sampled_from(sorted(DATASETS[name][1])), unique=True, max_size=4))
    options = {}
    for key in keys:
        if key == "colour":
            options[key] = draw(st.sampled_from(sorted(COLOURS)))
        else:
            lo, hi = _bounds(name, key)
            options[key] = draw(st.integers(lo, hi if hi is not None else 10**9))
    split = draw(st.sampled_from(SPLITS))
    explicit_split = draw(st.booleans()) or not options
    parts = [name] + ([split] if explicit_split else [])
    if options:
        parts.append(",".join(f"{k}={v}" for k, v in options.items()))
    return ":".join(parts), name, split if explicit_split else "test", options


@settings(deadline=None)
@given(data_specs())
def test_well_formed_specs_parse_exactly(case):
    text, name, split, options = case
    spec = parse_data_spec(text)
    assert (spec.name, spec.split, spec.options, spec.root) == (name, split, options, None)
    assert parse_data_spec(str(spec)) == spec


@settings(deadline=None)
@given(st.sampled_from(SYNTHETIC), st.data())
def test_out_of_range_values_are_refused(name, data):
    key = data.draw(st.sampled_from([k for k, t in DATASETS[name][1].items() if t is int]))
    lo, hi = _bounds(name, key)
    below = st.integers(max_value=lo - 1)
    value = data.draw(below | st.integers(min_value=hi + 1) if hi is not None else below)
    with pytest.raises(VitlensError, match=f"{key}={value} out of range for {name}"):
        parse_data_spec(f"{name}:test:{key}={value}")


_segment = st.text(alphabet=st.characters(blacklist_characters=":", blacklist_categories=("Cs",)), min_size=1)


@settings(deadline=None)
@given(_segment, st.text(alphabet=st.characters(blacklist_characters=":,=", blacklist_categories=("Cs",)), min_size=1))
def test_folder_specs(root, split):
    spec = parse_data_spec(f"folder:{root}:{split}")
    assert spec == DataSpec("folder", split, {}, root)
    assert parse_data_spec(str(spec)) == spec


_spec_noise = st.lists(
    st.sampled_from([*DATASETS, *SPLITS, ":", ",", "=", "n", "seed", "grid", "size", "colour", "red", "1", "-3", "x"]),
    max_size=12,
).map("".join)


@settings(max_examples=300, deadline=None)
@given(_spec_noise | st.text(max_size=40))
def test_spec_parser_total(text):
    """Any text: a valid spec or a one-line VitlensError, nothing else."""
    try:
        spec = parse_data_spec(text)
    except VitlensError as e:
        assert "\n" not in str(e)
        return
    assert spec.name in DATASETS
    assert spec.name == "folder" or spec.split in SPLITS
    assert set(spec.options) <= set(DATASETS[spec.name][1])


# --- model URIs ---------------------------------------------------------------------------------

_key = st.from_regex(r"[a-z_][a-z0-9_]{0,10}", fullmatch=True).filter(lambda k: k != "pretrained")
_value = st.one_of(
    st.integers(-(10**6), 10**6).map(str),
    st.floats(allow_nan=False, allow_infinity=False, width=32).map(repr),
    st.sampled_from(["true", "false", "True", "blur", "avg", "a/b"]),
)
_name = st.text(alphabet=st.characters(blacklist_characters="?", blacklist_categories=("Cs",)), min_size=1).filter(
    str.strip
)


@settings(deadline=None)
@given(
    st.sampled_from(SCHEMES),
    _name,
    st.dictionaries(_key, _value, max_size=4),
    st.sampled_from([None, "0", "1", "true", "false"]),
)
def test_well_formed_uris_parse_exactly(scheme, name, options, pretrained):
    query = [f"{k}={v}" for k, v in options.items()] + ([f"pretrained={pretrained}"] if pretrained else [])
    uri = f"{scheme}:{name}" + ("?" + "&".join(query) if query else "")
    got_scheme, got_name, kwargs = parse_model_uri(uri)
    expected = {k: parse_value(v) for k, v in options.items()}
    if pretrained:
        expected["pretrained"] = pretrained in ("1", "true")
    assert (got_scheme, got_name, kwargs) == (scheme, name, expected)


@settings(deadline=None)
@given(st.sampled_from(SCHEMES), st.sampled_from(["2", "-1", "yes", "no", "0.5", "maybe", ""]))
def test_bad_pretrained_flag(scheme, flag):
    with pytest.raises(VitlensError, match="pretrained"):
        parse_model_uri(f"{scheme}:model?pretrained={flag}")


_uri_noise = st.lists(st.sampled_from([*SCHEMES, ":", "?", "&", "=", "pretrained", "0", "x", " ", "vit"]), max_size=10)


@settings(max_examples=300, deadline=None)
@given(_uri_noise.map("".join) | st.text(max_size=40))
def test_uri_parser_total(text):
    try:
        scheme, name, kwargs = parse_model_uri(text)
    except VitlensError as e:
        assert "\n" not in str(e)
        return
    assert scheme in SCHEMES and name.strip() and isinstance(kwargs, dict)
    assert kwargs.get("pretrained", True) in (True, False)


# --- images ---------------------------------------------------------------------------------------

#: EXIF orientation → what a viewer shows, in numpy (independent of PIL's transpose tables).
ORIENT = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.swapaxes(0, 1),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: np.rot90(a, 2).swapaxes(0, 1),
    8: lambda a: np.rot90(a, 1),
}
MODES = ["L", "RGB", "RGBA", "LA", "P", "1", "I;16", "I", "F"]


def _source(mode: str, h: int, w: int, rng: np.random.Generator) -> tuple[Image.Image, np.ndarray, float]:
    """A PIL image of ``mode`` and the [h, w, 3] float image it shows (alpha on black), with a tolerance."""
    if mode in ("L", "RGB"):
        a = rng.integers(0, 256, (h, w, 3) if mode == "RGB" else (h, w), dtype=np.uint8)
        rgb = np.broadcast_to(a[..., None], (h, w, 3)) if mode == "L" else a
        return Image.fromarray(a, mode), rgb / 255, 1e-6
    if mode in ("RGBA", "LA"):
        a = rng.integers(0, 256, (h, w, 4 if mode == "RGBA" else 2), dtype=np.uint8)
        colour = a[..., :3] if mode == "RGBA" else np.repeat(a[..., :1], 3, axis=2)
        return Image.fromarray(a, mode), colour / 255 * (a[..., -1:] / 255), 1.01 / 255
    if mode == "P":
        palette = rng.integers(0, 256, (256, 3), dtype=np.uint8)
        idx = rng.integers(0, 256, (h, w), dtype=np.uint8)
        im = Image.fromarray(idx, "P")
        im.putpalette(palette.flatten().tolist())
        return im, palette[idx] / 255, 1e-6
    if mode == "1":
        bits = rng.integers(0, 2, (h, w)).astype(bool)
        return Image.fromarray(bits), np.repeat(bits[..., None], 3, axis=2).astype(float), 1e-6
    if mode in ("I;16", "I"):
        a = rng.integers(0, 65536, (h, w))
        im = Image.fromarray(a.astype(np.uint16) if mode == "I;16" else a.astype(np.int32))
        return im, np.repeat(a[..., None], 3, axis=2) / 65535, 1e-6
    a = rng.random((h, w), dtype=np.float32)
    return Image.fromarray(a, "F"), np.repeat(a[..., None], 3, axis=2).astype(float), 1e-6


def _encode(im: Image.Image, orientation: int) -> io.BytesIO:
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    im.save(buf, format="TIFF" if im.mode in ("I", "F") else "PNG", exif=exif)
    buf.seek(0)
    return buf


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(MODES),
    st.integers(1, 40),
    st.integers(1, 40),
    st.integers(1, 8),
    st.integers(0, 2**32 - 1),
)
def test_load_image_any_mode_size_orientation(mode, h, w, orientation, seed):
    im, shown, tol = _source(mode, h, w, np.random.default_rng(seed))
    expected = torch.from_numpy(ORIENT[orientation](shown).copy()).permute(2, 0, 1).float()
    x, original = read_image(_encode(im, orientation))
    assert x.dtype == torch.float32 and x.shape == expected.shape and original == tuple(expected.shape[1:])
    assert (x - expected).abs().max() <= tol


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(MODES),
    st.integers(1, 48),
    st.integers(1, 48),
    st.integers(1, 8),
    st.integers(2, 24),
    st.integers(2, 24),
    st.integers(0, 2**32 - 1),
)
def test_load_image_resized_matches_torch(mode, h, w, orientation, th, tw, seed):
    """Resized while decoding = the full image resized by torch (bilinear, antialiased), whatever the mode."""
    im, shown, tol = _source(mode, h, w, np.random.default_rng(seed))
    full = torch.from_numpy(ORIENT[orientation](shown).copy()).permute(2, 0, 1).float()
    expected = F.interpolate(full[None], size=(th, tw), mode="bilinear", align_corners=False, antialias=True)[0]
    x, original = read_image(_encode(im, orientation), size=(th, tw))
    assert x.shape == (3, th, tw) and original == tuple(full.shape[1:])
    assert x.min() >= 0 and x.max() <= 1
    # 8-bit modes are resampled in 8 bits (rounding), alpha is resampled premultiplied before compositing
    assert (x - expected).abs().max() <= max(tol, 2.5 / 255)


def test_sixteen_bit_is_scaled_not_clipped(tmp_path):
    a = np.array([[0, 255, 256, 32768, 65535]], dtype=np.uint16)
    Image.fromarray(a).save(tmp_path / "x.png")
    x = load_image(tmp_path / "x.png")
    torch.testing.assert_close(x[0, 0], torch.from_numpy(a[0] / 65535).float())
    assert x[0, 0, 2] > x[0, 0, 1]  # 256 is brighter than 255: nothing saturates at 8 bits


def test_float_image_with_nan_is_refused(tmp_path):
    a = np.zeros((4, 4), dtype=np.float32)
    a[1, 2] = np.nan
    Image.fromarray(a, "F").save(tmp_path / "nan.tiff")
    with pytest.raises(VitlensError, match="nan.tiff: image contains NaN or Inf"):
        load_image(tmp_path / "nan.tiff")


def test_transparent_palette_and_grey(tmp_path):
    p = Image.fromarray(np.array([[0, 1]], dtype=np.uint8), "P")
    p.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    p.info["transparency"] = 0
    p.save(tmp_path / "p.png", transparency=0)
    torch.testing.assert_close(load_image(tmp_path / "p.png")[:, 0].T, torch.tensor([[0.0, 0, 0], [0, 1, 0]]))
    g = Image.fromarray(np.array([[10, 200]], dtype=np.uint8), "L")
    g.save(tmp_path / "g.png", transparency=10)
    torch.testing.assert_close(load_image(tmp_path / "g.png")[:, 0].T, torch.tensor([[0.0] * 3, [200 / 255] * 3]))


def test_jpeg_decoded_at_reduced_scale(tmp_path):
    """A large JPEG asked for at a small size is decoded at 1/8 scale and still matches a full decode."""
    yy, xx = np.mgrid[0:1600, 0:2400]
    a = np.stack([xx / 2400 * 255, yy / 1600 * 255, np.full_like(xx, 90.0)], -1).astype(np.uint8)
    Image.fromarray(a).save(tmp_path / "big.jpg", quality=95)
    small, original = read_image(tmp_path / "big.jpg", size=(32, 48))
    assert original == (1600, 2400) and small.shape == (3, 32, 48)
    full = F.interpolate(load_image(tmp_path / "big.jpg")[None], size=(32, 48), mode="bilinear", antialias=True)[0]
    assert (small - full).abs().mean() < 0.01
