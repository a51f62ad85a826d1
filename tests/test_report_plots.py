"""The report's figures and image grids, inspected before saving: each grid family is one line through its
rates, a marker per tokenizer; PSNR intervals as error bars; BPE curves drawn so they do not hide the curve
they sit on; the modelability plot joins a family's priors; grid titles fit their columns."""

from __future__ import annotations

import numpy as np
import torch
from matplotlib.container import ErrorbarContainer
from PIL import Image, ImageDraw

from base.schema import SamplingConfig
from base.visualize import MARGIN, fit_title, save_image_grid
from evaluation.plots import modelability_figure, plot_tradeoff, tradeoff_figure
from evaluation.rows import EvaluationResult, PriorRow, SamplerSettings, TokenizerRow

GRIDS = {  # name: (tokens, bits, PSNR); listed out of rate order on purpose
    "fsq_f4_1000": (64, 638.0, 24.46), "fsq_f8_64": (16, 96.0, 20.89), "fsq_f4_64": (64, 384.0, 23.30),
    "fsq_f8_1000": (16, 159.5, 21.69),
}


def row(name: str, family: str, tokens: float, bits: float, psnr: float, *, k: int | None = None,
        decoding: str = "deterministic", target: float | None = None, bpe: str | None = None) -> TokenizerRow:
    mode = f"adaptive@{target:g}dB" if target else f"k={k}" if k else "all"
    return TokenizerRow(
        name=name, family=family, path=f"runs/{name.removesuffix('_bpe')}", bpe=bpe,
        mode=mode + (" mean" if decoding == "mean" else ""), decoding=decoding, k=k, target_psnr=target,
        vocab_size=1000, bits_basis="tokens x log2(vocab)", decoder=None, tokens_per_image=tokens,
        tokens_min=int(tokens), tokens_max=int(tokens), bits_per_token=bits / tokens, bits_per_image=bits,
        psnr=psnr, ssim=0.7, rfid=100.0 / bits, rfid_backbone="test", rfid_num_real=8, rfid_num_fake=8,
        psnr_ci=[psnr - 0.3, psnr + 0.2], ssim_ci=[0.6, 0.8], rkid=1.0 / bits, rkid_std=0.1 / bits)


def study_rows() -> list[TokenizerRow]:
    """A study's shape: four grid FSQ codes, a 1D tokenizer named like its family (sampled and mean decodes,
    k = 1..8), the BPE codec over it (the same PSNR at about the same bits), an adaptive row, a token set."""
    rows = [row(name, "grid_vq", *values) for name, values in GRIDS.items()]
    for decoding, lift in (("sample", 0.0), ("mean", 1.2)):
        for k in (8, 1, 4, 2):  # out of order on purpose
            rows.append(row("1d", "1d", k, 10.0 * k, 14.0 + k / 2 + lift, k=k, decoding=decoding))
            rows.append(row("1d_bpe", "1d+bpe", k * 0.95, 10.1 * k, 14.0 + k / 2 + lift, k=k, decoding=decoding,
                            bpe="runs/1d_bpe"))
    rows.append(row("1d", "1d", 6.5, 65.0, 17.0, decoding="sample", target=17.0))
    rows.append(row("1d_set", "token_set", 8, 60.0, 17.2, decoding="sample"))
    return rows


def lines_by_label(ax) -> dict:
    return {line.get_label(): line for line in ax.get_lines()}


def test_a_family_of_single_rate_tokenizers_is_one_line_through_its_rates():
    figure = tradeoff_figure(study_rows(), "bits_per_image", "bits per image", "test")
    psnr_axis = figure.axes[0]
    lines = lines_by_label(psnr_axis)
    order = sorted(GRIDS, key=lambda n: GRIDS[n][1])
    family = lines["grid_vq family"]
    assert list(family.get_xdata()) == [GRIDS[n][1] for n in order]
    assert list(family.get_ydata()) == [GRIDS[n][2] for n in order]
    # each tokenizer on the line: its own point, its own marker, named in the legend
    markers = [lines[name].get_marker() for name in order]
    assert len(set(markers)) == len(order)
    assert [(lines[n].get_xdata()[0], lines[n].get_ydata()[0]) for n in order] == [GRIDS[n][1:] for n in order]
    # a tokenizer with several rates keeps its own line, sorted by rate, even when named like its family
    sample = lines["1d (1d, sample)"]
    assert list(sample.get_xdata()) == [10.0, 20.0, 40.0, 80.0] and sample.get_marker() == "o"
    assert lines["1d (1d, mean)"].get_linestyle() == ":"
    assert "1d family" not in lines and "token_set family" not in lines  # one member: just its point
    assert lines["1d_set (token_set, sample)"].get_xdata()[0] == 60.0
    assert lines["1d adaptive @17 dB"].get_marker() == "*"
    # the rFID panel draws the same curves
    assert list(lines_by_label(figure.axes[1])["grid_vq family"].get_xdata()) == [GRIDS[n][1] for n in order]


def r6(value: float) -> float:
    return round(float(value), 6)


def bar_spans(ax) -> set[tuple[float, float, float]]:
    """(x, low, high) of every vertical error bar on the axis."""
    spans = set()
    for container in ax.containers:
        assert isinstance(container, ErrorbarContainer)
        for collection in container.lines[2]:
            for segment in collection.get_segments():
                (x, low), (_, high) = segment
                spans.add((r6(x), r6(low), r6(high)))
    return spans


def test_psnr_intervals_and_rkid_spread_are_error_bars():
    rows = study_rows()
    figure = tradeoff_figure(rows, "tokens_per_image", "tokens per image", "test")
    psnr_axis, rfid_axis, rkid_axis = figure.axes[:3]
    assert bar_spans(psnr_axis) == {(r6(r.tokens_per_image), r6(r.psnr_ci[0]), r6(r.psnr_ci[1])) for r in rows}
    assert bar_spans(rkid_axis) == {(r6(r.tokens_per_image), r6(r.rkid - r.rkid_std), r6(r.rkid + r.rkid_std))
                                    for r in rows}
    assert not rfid_axis.containers  # rFID has no interval: no bars invented for it


def test_bpe_curves_stay_visible_on_the_curve_they_code():
    lines = lines_by_label(tradeoff_figure(study_rows(), "bits_per_image", "bits", "test").axes[0])
    plain, bpe = lines["1d (1d, sample)"], lines["1d_bpe (1d+bpe, sample)"]
    assert list(bpe.get_ydata()) == list(plain.get_ydata())  # lossless: the same PSNR, so the curves coincide
    assert bpe.get_linestyle() == "--" and plain.get_linestyle() == "-"
    assert bpe.get_markerfacecolor() == "none" and plain.get_markerfacecolor() != "none"
    assert bpe.get_markersize() > plain.get_markersize() and bpe.get_zorder() < plain.get_zorder()
    mean_plain, mean_bpe = lines["1d (1d, mean)"], lines["1d_bpe (1d+bpe, mean)"]
    assert mean_bpe.get_linestyle() != mean_plain.get_linestyle() and mean_bpe.get_markerfacecolor() == "none"


def test_plot_tradeoff_writes_a_png(tmp_path):
    path = plot_tradeoff(study_rows(), "bits_per_image", "bits per image", "test", tmp_path / "bits.png")
    with Image.open(path) as png:
        assert png.format == "PNG" and png.width > 1000


def prior(name: str, tokenizer: TokenizerRow, bits: float) -> PriorRow:
    settings = SamplerSettings(samples=8, seed=0, batch_size=8, labels="unconditional", flow=False,
                               sampling=SamplingConfig(), decoder=None)
    return PriorRow(
        name=name, path=f"runs/{name}", kind="discrete", tokens="full", target_psnr=None, tokenizer=tokenizer.path,
        tokenizer_family=tokenizer.family, bpe=None, num_classes=0, sampler=settings, nll_bits_per_image=bits,
        flow_val_loss=None, nll_prefix_bits=None, nll_images=8, tokens_per_image=tokenizer.tokens_per_image,
        gfid=1.0, gfid_backbone="test", gfid_num_real=8, gfid_num_fake=8, gkid=0.0, gkid_std=0.0,
        sampling_seconds=1.0, sampling_images_per_s=8.0)


def test_modelability_joins_a_family_s_priors_with_psnr_intervals():
    grids = [r for r in study_rows() if r.family == "grid_vq"]
    nll = {"fsq_f8_64": 55.0, "fsq_f8_1000": 92.0, "fsq_f4_1000": 273.0}  # f4/64 has no prior
    priors = [prior(f"prior_{r.name}", r, nll[r.name]) for r in grids if r.name in nll]
    result = EvaluationResult(meta={}, originals=torch.zeros(1, 3, 8, 8), tokenizer_rows=grids, prior_rows=priors)
    ax = modelability_figure(result).axes[0]
    joined = [line for line in ax.get_lines() if len(line.get_xdata()) == 3]
    assert len(joined) == 1
    order = sorted(nll, key=nll.get)
    assert list(joined[0].get_xdata()) == [GRIDS[n][2] for n in order]
    assert list(joined[0].get_ydata()) == [nll[n] for n in order]
    markers = {container.lines[0].get_marker() for container in ax.containers}
    assert len(markers) == 3  # a marker per prior
    horizontal = set()
    for container in ax.containers:
        for collection in container.lines[2]:
            for (low, y), (high, _) in collection.get_segments():
                horizontal.add((r6(y), r6(low), r6(high)))
    assert horizontal == {(nll[n], r6(GRIDS[n][2] - 0.3), r6(GRIDS[n][2] + 0.2)) for n in order}


LONG_TITLES = ["k=1", "fsq_f4_1000 64 tok", "kl_f8 16 tok", "1d_set 32 tok", "token_set_large 32 tok",
               "a_tokenizer_name_far_too_long_for_any_column_at_all 1024 tok", "original"]


def test_long_titles_fit_their_columns(tmp_path):
    columns = [torch.rand(3, 3, 16, 16) * 2 - 1 for _ in LONG_TITLES]
    path = save_image_grid(columns, tmp_path / "grid.png", LONG_TITLES)  # 16 px images upscaled to 64 px cells
    cell, pad = 64, 2
    with Image.open(path) as png:
        canvas = np.asarray(png.convert("L"))
    draw = ImageDraw.Draw(Image.new("RGB", (10, 10)))
    header = canvas.shape[0] - 3 * (cell + pad) - pad
    for j, title in enumerate(LONG_TITLES):
        x = pad + j * (cell + pad)
        lines, font = fit_title(title, cell)
        assert len(lines) <= 2
        for i, line in enumerate(lines):
            left, _, right, bottom = draw.textbbox((x + MARGIN, 1 + i * (font.getbbox("Ag")[3] + 1)), line,
                                                     font=font)
            assert x <= left and right <= x + cell, (title, line)
            assert bottom <= header, (title, line)
        if j < 5:  # every title of a real study's length is shown whole
            assert "".join(lines) == title
    assert fit_title(LONG_TITLES[5], cell)[0][-1].endswith("…")
    # the pixels agree: nothing is drawn in the gaps between columns, in the title band
    gaps = [pad + j * (cell + pad) - pad + d for j in range(1, len(LONG_TITLES)) for d in range(pad)]
    assert (canvas[:header, gaps] == 255).all()
    assert (canvas[:header, pad:pad + cell] < 128).any()  # and the titles are drawn
