"""The report's figures: quality against rate (tokens or bits per image), prior NLL against
reconstruction quality, generation quality against tokens per image, adaptive lengths, and the image
grid of reconstructions."""

from __future__ import annotations

from pathlib import Path

from matplotlib import ticker
from matplotlib.figure import Figure

from base.files import atomic_write
from base.visualize import save_image_grid

from .ablation import Comparison
from .rows import CodecRow, EvaluationResult, PriorRow, TokenizerRow
from .tail import TailDiagnostics

__all__ = ["modelability_figure", "plot_ablation", "plot_adaptive_lengths", "plot_codec_rate_distortion",
           "plot_generation", "plot_modelability", "plot_tail", "plot_tradeoff", "save_codec_examples",
           "save_reconstruction_grid", "tradeoff_figure"]

FAMILY_COLOURS = {  # BPE variants get a related colour, a dashed line and hollow markers
    "1d": "tab:blue", "1d+bpe": "tab:cyan", "token_set": "tab:purple", "token_set+bpe": "tab:pink",
    "grid_vq": "tab:orange", "grid_vq+bpe": "tab:brown", "grid_kl": "tab:green",
}
POINT_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "h", "<", ">")  # one per tokenizer on a family's line


def _curves(rows: list[TokenizerRow]) -> dict[tuple[str, str, bool], list[TokenizerRow]]:
    """One curve per line of the rate axis, its fixed-length rows sorted by rate (bits per image): a tokenizer
    with several rates (a 1D tokenizer's prefixes) is its own curve; tokenizers with one rate each join their
    family's curve (the grid FSQ codes at f8/f4 x 64/1000 codes are one line). Mean and sampled decodings are
    separate curves; adaptive rows are left out (drawn as stars). Keys: (tokenizer or family, decoding, whether
    the curve joins single-rate tokenizers)."""
    fixed = [r for r in rows if not r.adaptive]
    rates = {}
    for row in fixed:
        rates.setdefault((row.name, row.decoding), set()).add(row.bits_per_image)
    groups: dict[tuple[str, str, bool], list[TokenizerRow]] = {}
    for row in fixed:
        joined = len(rates[(row.name, row.decoding)]) == 1
        groups.setdefault((row.family if joined else row.name, row.decoding, joined), []).append(row)
    return {key: sorted(group, key=lambda r: (r.bits_per_image, r.tokens_per_image))
            for key, group in groups.items()}


def _line_style(family: str, decoding: str) -> dict:
    """Posterior means dotted; BPE (lossless: the same quality at fewer tokens, so its curve sits on the one it
    codes) dashed with larger hollow markers drawn beneath, so both stay visible."""
    bpe = family.endswith("+bpe")
    linestyle = (("-." if bpe else ":") if decoding == "mean" else "--" if bpe else "-")
    style = {"color": FAMILY_COLOURS.get(family, "tab:gray"), "linestyle": linestyle}
    if bpe:
        style.update(markerfacecolor="none", markersize=10, markeredgewidth=1.5, zorder=1)
    else:
        style.update(markersize=6, zorder=2)
    return style


def _interval(row: TokenizerRow, metric: str) -> tuple[float, float] | None:
    """How far below and above the point its error bar reaches: the PSNR's bootstrap interval, rKID's spread
    over subsets; None where the row measures none (rFID)."""
    if metric == "psnr":
        return row.psnr - row.psnr_ci[0], row.psnr_ci[1] - row.psnr
    if metric == "rkid":
        return row.rkid_std, row.rkid_std
    return None


def _errorbars(ax, rows: list[TokenizerRow], x_key: str, metric: str, colour: str) -> None:
    spans = [_interval(r, metric) for r in rows]
    if rows and all(s is not None for s in spans):
        ax.errorbar([getattr(r, x_key) for r in rows], [getattr(r, metric) for r in rows],
                    yerr=[[s[0] for s in spans], [s[1] for s in spans]], fmt="none", ecolor=colour, elinewidth=1,
                    capsize=3, alpha=0.7)


def _draw_curve(ax, key: tuple[str, str, bool], group: list[TokenizerRow], x_key: str, metric: str) -> None:
    """A tokenizer's own curve: one marker; a family's curve of single-rate tokenizers: a marker per tokenizer,
    each named in the legend."""
    name, decoding, joined = key
    family = group[0].family
    style = _line_style(family, decoding)
    xs, ys = [getattr(r, x_key) for r in group], [getattr(r, metric) for r in group]
    suffix = f", {decoding}" if decoding != "deterministic" else ""
    if not joined or len(group) == 1:
        ax.plot(xs, ys, marker="o", label=f"{group[0].name if joined else name} ({family}{suffix})", **style)
    else:
        ax.plot(xs, ys, label=f"{family} family{suffix}", **style)
        for marker, row, x, y in zip(POINT_MARKERS * len(group), group, xs, ys):
            ax.plot([x], [y], marker=marker, label=f"{row.name}{' ' + decoding if decoding == 'mean' else ''}",
                    **{**style, "linestyle": "none", "markersize": style["markersize"] + 2})
    _errorbars(ax, group, x_key, metric, style["color"])


METRICS = (("psnr", "PSNR (dB), higher is better"), ("rfid", "rFID, lower is better"),
           ("rkid", "rKID, lower is better"))


def _log2_axis(ax, label: str) -> None:
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_xlabel(f"{label} (log2 scale)")
    ax.grid(True, which="major", alpha=0.3)


def _save(figure: Figure, path: Path) -> Path:
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=110))
    return path


def tradeoff_figure(rows: list[TokenizerRow], x_key: str, x_label: str, backbone: str) -> Figure:
    """PSNR, rFID and rKID against `x_key` on a log2 axis (see `plot_tradeoff`)."""
    figure = Figure(figsize=(17, 5.6), layout="constrained")
    axes = figure.subplots(1, len(METRICS))
    for ax, (metric, ylabel) in zip(axes, METRICS):
        for key, group in _curves(rows).items():
            _draw_curve(ax, key, group, x_key, metric)
        for r in (r for r in rows if r.adaptive):
            colour = FAMILY_COLOURS.get(r.family, "tab:gray")
            ax.plot(getattr(r, x_key), getattr(r, metric), "*", markersize=15, color=colour,
                    markeredgecolor="black", label=f"{r.name} adaptive @{r.target_psnr:g} dB", zorder=3)
            _errorbars(ax, [r], x_key, metric, colour)
        _log2_axis(ax, x_label)
        ax.set_ylabel(ylabel)
    axes[1].set_title(f"FID/KID backbone: {backbone}", fontsize=9)
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside lower center", ncols=min(5, len(labels)), fontsize=8)
    figure.suptitle(f"Held-out reconstruction quality against {x_label} (bars: PSNR 95% bootstrap interval, "
                    f"rKID ± its spread over subsets)")
    return figure


def plot_tradeoff(rows: list[TokenizerRow], x_key: str, x_label: str, backbone: str, path: Path) -> Path:
    """PSNR, rFID and rKID against `x_key` on a log2 axis: one line per tokenizer with several rates (the 1D
    prefixes) and one per family of single-rate tokenizers (the grids, through their rates, a marker each),
    coloured by family; posterior means dotted, BPE dashed with hollow markers, adaptive lengths as stars."""
    return _save(tradeoff_figure(rows, x_key, x_label, backbone), path)


def _modelled(result: EvaluationResult) -> dict[str, list[tuple[PriorRow, TokenizerRow]]]:
    """Each discrete prior with the reconstruction row of the tokens it models, by that row's family, sorted
    by the prior's bits per image (the family's rates)."""
    families: dict[str, list[tuple[PriorRow, TokenizerRow]]] = {}
    for prior in result.prior_rows:
        row = None if prior.nll_bits_per_image is None else result.reconstruction_of(prior)
        if row is not None:
            families.setdefault(row.family, []).append((prior, row))
    return {family: sorted(pairs, key=lambda pair: pair[0].nll_bits_per_image) for family, pairs in families.items()}


def modelability_figure(result: EvaluationResult) -> Figure:
    """The figure of `plot_modelability`."""
    figure = Figure(figsize=(7.5, 5.5), layout="constrained")
    ax = figure.subplots()
    for family, pairs in _modelled(result).items():
        style = _line_style(family, "deterministic")
        colour = style["color"]
        if len(pairs) > 1:  # the family through its rates
            ax.plot([row.psnr for _, row in pairs], [prior.nll_bits_per_image for prior, _ in pairs],
                    **{**style, "linewidth": 1, "alpha": 0.6})
        for marker, (prior, row) in zip(POINT_MARKERS * len(pairs), pairs):
            ax.errorbar(row.psnr, prior.nll_bits_per_image, xerr=[[row.psnr - row.psnr_ci[0]],
                        [row.psnr_ci[1] - row.psnr]], fmt=marker, capsize=3,
                        **{**style, "markersize": style["markersize"] + 3, "markeredgecolor": "black"
                           if not family.endswith("+bpe") else colour, "zorder": 3})
            ax.annotate(f"{prior.name} ({row.mode})", (row.psnr, prior.nll_bits_per_image),
                        textcoords="offset points", xytext=(6, 4), fontsize=8)
            points = [(k, rec.psnr, bits) for k, bits, rec in result.prefix_points(prior)]
            if points:
                ax.plot([p[1] for p in points], [p[2] for p in points], ":", marker=".", color=colour, zorder=2,
                        label=f"{prior.name}: first k tokens")
                for k, x, y in points[:-1]:
                    ax.annotate(f"k={k}", (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="upper left")
    ax.set_xlabel("reconstruction PSNR of the modelled tokens (dB; bars: 95% bootstrap interval)")
    ax.set_ylabel("prior's held-out NLL (bits per image), lower is easier to model")
    ax.grid(True, alpha=0.3)
    figure.suptitle("Modelability against reconstruction quality")
    return figure


def plot_modelability(result: EvaluationResult, path: Path) -> Path:
    """Each discrete prior's held-out NLL (bits per image) against the reconstruction PSNR of the tokens
    it models: down and to the right is cheaper to model at better quality. The priors of one family are one
    line through their rates, a marker each; a prior over an ordered 1D stream is also drawn as a dotted line
    through its prefixes k = 1, 2, 4, ...: the bits of the first k tokens against the reconstruction from k
    tokens."""
    return _save(modelability_figure(result), path)


def plot_generation(rows: list[PriorRow], backbone: str, path: Path) -> Path:
    """gFID and gKID of each prior's samples against the tokens per image of the stream it models (the mean
    over the held-out images)."""
    figure = Figure(figsize=(12, 5), layout="constrained")
    axes = figure.subplots(1, 2)
    for ax, metric, label in zip(axes, ("gfid", "gkid"), ("gFID, lower is better", "gKID, lower is better")):
        for prior in rows:
            colour = FAMILY_COLOURS.get(prior.tokenizer_family, "tab:gray")
            value = getattr(prior, metric)
            ax.scatter(prior.tokens_per_image, value, s=70, color=colour, edgecolor="black", zorder=3)
            ax.annotate(prior.name, (prior.tokens_per_image, value), textcoords="offset points", xytext=(6, 4),
                        fontsize=8)
            if metric == "gkid":
                ax.errorbar(prior.tokens_per_image, value, yerr=prior.gkid_std, color=colour, capsize=3)
        _log2_axis(ax, "tokens per image")
        ax.set_ylabel(label)
    axes[0].set_title(f"FID/KID backbone: {backbone}", fontsize=9)
    figure.suptitle("Generation quality against tokens per image")
    return _save(figure, path)


def plot_adaptive_lengths(rows: list[TokenizerRow], path: Path) -> Path:
    """How many held-out images each adaptive row gave each length (the shortest prefix meeting its target)."""
    adaptive = [r for r in rows if r.adaptive and r.length_counts]
    figure = Figure(figsize=(6 + 2 * len(adaptive), 4.5), layout="constrained")
    ax = figure.subplots()
    width = 0.8 / max(1, len(adaptive))
    lengths = sorted({int(k) for r in adaptive for k in r.length_counts})
    for i, row in enumerate(adaptive):
        counts = [row.length_counts.get(str(k), 0) for k in lengths]
        ax.bar([j + i * width for j in range(len(lengths))], counts, width,
               label=f"{row.name} @{row.target_psnr:g} dB ({row.tokens_per_image:.1f} tokens on average)")
    ax.set_xticks([j + width * (len(adaptive) - 1) / 2 for j in range(len(lengths))], [str(k) for k in lengths])
    ax.set_xlabel("tokens chosen for the image")
    ax.set_ylabel("held-out images")
    ax.legend(fontsize=8)
    figure.suptitle("Adaptive lengths")
    return _save(figure, path)


def _grid_title(row: TokenizerRow, one_1d: bool) -> str:
    """k for the 1D tokenizer, name and tokens for the others; `save_image_grid` wraps it at the space to fit
    its column (a colon between them was lost in the small font)."""
    if row.family == "1d":
        return f"k={row.k}" if one_1d else f"{row.name} k={row.k}"
    return f"{row.name} {row.tokens_per_image:g} tok"


def save_reconstruction_grid(result: EvaluationResult, path: Path) -> Path:
    """Rows: held-out images. Columns: each 1D tokenizer at k = 1, 2, 4, ..., R, then the fixed-length
    tokenizers (token sets, grid baselines), then the original. BPE rows are skipped (BPE is lossless), and so
    are posterior means (the grid shows what a decoder generates)."""
    plain = [r for r in result.tokenizer_rows
             if not r.family.endswith("+bpe") and not r.adaptive and r.decoding != "mean"]
    chosen = sorted(plain, key=lambda r: r.family != "1d")  # 1D first; stable: config order otherwise
    one_1d = len({r.name for r in chosen if r.family == "1d"}) == 1
    columns = [result.previews[(r.name, r.mode)] for r in chosen] + [result.originals]
    titles = [_grid_title(r, one_1d) for r in chosen] + ["original"]
    return save_image_grid(columns, path, titles)


CODEC_STYLES = {"jpeg": ("black", "s"), "webp": ("tab:red", "D")}  # Pillow's baselines; ours by family
CODEC_MARKERS = {"1d": "o", "1d+bpe": "v", "token_set": "P", "grid_vq": "^", "grid_vq+bpe": "<"}


def plot_codec_rate_distortion(rows: list[CodecRow], backbone: str, tile: int, path: Path) -> Path:
    """PSNR and patch FID against bits per pixel (log scale) of whole-image files: one line per codec (each
    prior's codec at its settings, JPEG and WebP over their qualities), adaptive settings as stars."""
    figure = Figure(figsize=(13, 5.2), layout="constrained")
    axes = figure.subplots(1, 2)
    groups: dict[str, list[CodecRow]] = {}
    for row in rows:
        groups.setdefault(row.name, []).append(row)
    for name, group in groups.items():
        family = group[0].family
        colour, marker = CODEC_STYLES.get(family, (FAMILY_COLOURS.get(family, "tab:gray"), CODEC_MARKERS.get(
            family, "o")))
        line = sorted((r for r in group if r.target_psnr is None), key=lambda r: r.bits_per_pixel)
        for ax, metric in zip(axes, ("psnr", "rfid")):
            ax.plot([r.bits_per_pixel for r in line], [getattr(r, metric) for r in line], "-" if group[0].ours else
                    "--", marker=marker, color=colour, label=f"{name} ({family})")
            for r in group:
                if r.target_psnr is not None:
                    ax.plot(r.bits_per_pixel, getattr(r, metric), "*", markersize=14, color=colour,
                            markeredgecolor="black", label=f"{name} {r.setting}")
    for ax, label in zip(axes, ("PSNR (dB), higher is better", f"patch FID ({tile} px tiles), lower is better")):
        ax.set_xscale("log")
        ax.set_xlabel("bits per pixel of the whole file (log scale)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    axes[1].set_title(f"FID backbone: {backbone}", fontsize=9)
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside lower center", ncols=min(4, len(labels)), fontsize=9)
    figure.suptitle("Image codecs on whole held-out images: quality against file size")
    return _save(figure, path)


def save_codec_examples(result: EvaluationResult, path: Path) -> Path:
    """One held-out image: JPEG at its lowest quality, each other codec at the setting whose bits per pixel are
    nearest JPEG's there, and the original; titles give each file's bits per pixel."""
    rows = result.codec_rows
    floor = min((r for r in rows if r.family == "jpeg"), key=lambda r: r.bits_per_pixel)
    chosen = [floor]
    for name in dict.fromkeys(r.name for r in rows if r.name != "jpeg"):
        chosen.append(min((r for r in rows if r.name == name),
                          key=lambda r: abs(r.bits_per_pixel - floor.bits_per_pixel)))
    columns = [result.codec_examples[(r.name, r.setting)][None] for r in chosen]
    titles = [f"{r.name} {r.bits_per_pixel:.2g}bpp" for r in chosen]  # settings: in the summary's table
    return save_image_grid(columns + [result.codec_examples[("original", "")][None]], path, titles + ["original"],
                           min_cell=160)


# one per tokenizer: ten, so that an ablation of up to ten rows never draws two rows alike
TAIL_COLOURS = ("tab:blue", "tab:red", "tab:green", "tab:purple", "tab:brown", "tab:olive", "tab:orange", "tab:cyan",
                "tab:pink", "tab:gray")
PRIOR_MARKERS = ("s", "^", "D", "v")  # one per prior of a tokenizer


def plot_tail(tails: list[TailDiagnostics], path: Path) -> Path:
    """Left: each register position's held-out code entropy (solid) and each prior's bits there (dashed),
    against position, with log2 of the codebook (and log2 of the image count, where lower) as grey lines. Right:
    the PSNR gained from k to 2k tokens with
    its paired 95% interval, against 2k; posterior means dotted."""
    figure = Figure(figsize=(13, 5.2), layout="constrained")
    bits_ax, gain_ax = figure.subplots(1, 2)
    for tail, colour in zip(tails, TAIL_COLOURS * len(tails)):
        positions = range(1, tail.registers + 1)
        if tail.code_entropy_bits:
            bits_ax.plot(positions, tail.code_entropy_bits, "-o", color=colour, markersize=4,
                         label=f"{tail.tokenizer}: code entropy")
        for (prior, bits), marker in zip(tail.prior_bits.items(), PRIOR_MARKERS * len(tail.prior_bits)):
            bits_ax.plot(positions, bits, "--", marker=marker, color=colour, markersize=4,
                         label=f"{tail.tokenizer}: prior {prior}")
        bits_ax.axhline(tail.codebook_bits, color="gray", linewidth=1, linestyle="-.")
        if tail.entropy_ceiling_bits < tail.codebook_bits:  # few images: the plug-in entropy cannot exceed log2 N
            bits_ax.axhline(tail.entropy_ceiling_bits, color="gray", linewidth=1, linestyle=":")
        for decoding in dict.fromkeys(d.decoding for d in tail.doublings):
            steps = [d for d in tail.doublings if d.decoding == decoding]
            gains = [d.gain_db for d in steps]
            spans = [[g - d.gain_ci[0] for g, d in zip(gains, steps)], [d.gain_ci[1] - g for g, d in zip(gains, steps)]]
            gain_ax.errorbar([d.next_k for d in steps], gains, yerr=spans, fmt=":o" if decoding == "mean" else "-o",
                             color=colour, capsize=3, markersize=4, label=f"{tail.tokenizer} ({decoding})")
    bits_ax.set_xlabel("register position")
    bits_ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    bits_ax.set_ylabel("bits (grey: log2 codebook; dotted: log2 images, the plug-in ceiling)")
    bits_ax.grid(True, alpha=0.3)
    gain_ax.axhline(0.0, color="gray", linewidth=1)
    _log2_axis(gain_ax, "tokens after the step, 2k")
    gain_ax.set_ylabel("PSNR gained from k to 2k tokens (dB)")
    for ax in (bits_ax, gain_ax):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    figure.suptitle("Tail diagnostics: what each further register carries and buys (held-out images)")
    return _save(figure, path)


def plot_ablation(comparisons: list[Comparison], path: Path) -> Path:
    """Each entry's PSNR difference from the baseline against k, with its paired 95% interval (posterior
    means solid, samples dotted), and the baseline's zero line."""
    figure = Figure(figsize=(8, 5.2), layout="constrained")
    ax = figure.subplots()
    others = [c for c in comparisons if c.effects]
    for comparison, colour in zip(others, TAIL_COLOURS * len(others)):
        for decoding in dict.fromkeys(e.decoding for e in comparison.effects):
            effects = sorted((e for e in comparison.effects if e.decoding == decoding and e.k is not None),
                             key=lambda e: e.k)
            spans = [[e.delta_db - e.delta_ci[0] for e in effects], [e.delta_ci[1] - e.delta_db for e in effects]]
            ax.errorbar([e.k for e in effects], [e.delta_db for e in effects], yerr=spans, capsize=3, markersize=4,
                        fmt=":o" if decoding == "sample" else "-o", color=colour,
                        label=f"{comparison.tokenizer} ({decoding})")
    ax.axhline(0.0, color="gray", linewidth=1)
    _log2_axis(ax, "tokens k")
    ax.set_ylabel(f"PSNR - {comparisons[0].baseline}'s PSNR at the same k (dB)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    figure.suptitle(f"Against {comparisons[0].baseline}, paired over the same held-out images (95% intervals)")
    return _save(figure, path)
