"""The report's figures: quality against rate (tokens or bits per image), prior NLL against
reconstruction quality, generation quality against tokens per image, adaptive lengths, and the image
grid of reconstructions."""

from __future__ import annotations

from pathlib import Path

from matplotlib import ticker
from matplotlib.figure import Figure

from base.files import atomic_write
from base.visualize import save_image_grid

from .rows import CodecRow, EvaluationResult, PriorRow, TokenizerRow

__all__ = ["plot_adaptive_lengths", "plot_codec_rate_distortion", "plot_generation", "plot_modelability",
           "plot_tradeoff", "save_codec_examples", "save_reconstruction_grid"]

FAMILY_COLOURS = {  # BPE variants get a related colour and a dashed line
    "1d": "tab:blue", "1d+bpe": "tab:cyan", "token_set": "tab:purple", "token_set+bpe": "tab:pink",
    "grid_vq": "tab:orange", "grid_vq+bpe": "tab:brown", "grid_kl": "tab:green",
}


def _curves(rows: list[TokenizerRow]) -> dict[tuple[str, str], list[TokenizerRow]]:
    """One curve per tokenizer and decoding (sample and mean rows of one tokenizer are two curves)."""
    groups: dict[tuple[str, str], list[TokenizerRow]] = {}
    for row in rows:
        groups.setdefault((row.name, row.decoding), []).append(row)
    return groups


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


def plot_tradeoff(rows: list[TokenizerRow], x_key: str, x_label: str, backbone: str, path: Path) -> Path:
    """PSNR, rFID and rKID against `x_key` on a log2 axis: one line per tokenizer coloured by family,
    adaptive length as a star, fixed-length grid baselines as single points; posterior-mean curves dotted."""
    figure = Figure(figsize=(17, 5.2), layout="constrained")
    axes = figure.subplots(1, len(METRICS))
    for (name, decoding), group in _curves(rows).items():
        family = group[0].family
        colour = FAMILY_COLOURS.get(family, "tab:gray")
        style = ":" if decoding == "mean" else "--" if family.endswith("+bpe") else "-"
        fixed = [r for r in group if not r.adaptive]
        label = f"{name} ({family}{', ' + decoding if decoding != 'deterministic' else ''})"
        for ax, (metric, _) in zip(axes, METRICS):
            ax.plot([getattr(r, x_key) for r in fixed], [getattr(r, metric) for r in fixed], style,
                    marker="o" if len(fixed) > 1 else "s", markersize=6 if len(fixed) > 1 else 9, color=colour,
                    label=label)
            for r in group:
                if r.adaptive:
                    ax.plot(getattr(r, x_key), getattr(r, metric), "*", markersize=15, color=colour,
                            markeredgecolor="black", label=f"{name} adaptive @{r.target_psnr:g} dB")
    axes[1].set_title(f"FID/KID backbone: {backbone}", fontsize=9)
    for ax, (_, ylabel) in zip(axes, METRICS):
        _log2_axis(ax, x_label)
        ax.set_ylabel(ylabel)
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside lower center", ncols=min(4, len(labels)), fontsize=9)
    figure.suptitle(f"Held-out reconstruction quality against {x_label}")
    return _save(figure, path)


def plot_modelability(result: EvaluationResult, path: Path) -> Path:
    """Each discrete prior's held-out NLL (bits per image) against the reconstruction PSNR of the tokens
    it models: down and to the right is cheaper to model at better quality. A prior over an ordered 1D stream
    is also drawn as a line through its prefixes k = 1, 2, 4, ...: the bits of the first k tokens against
    the reconstruction from k tokens."""
    figure = Figure(figsize=(7.5, 5.5), layout="constrained")
    ax = figure.subplots()
    for prior in result.prior_rows:
        row = None if prior.nll_bits_per_image is None else result.reconstruction_of(prior)
        if row is None:
            continue
        colour = FAMILY_COLOURS.get(row.family, "tab:gray")
        ax.scatter(row.psnr, prior.nll_bits_per_image, s=70, color=colour, edgecolor="black", zorder=3)
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
    ax.set_xlabel("reconstruction PSNR of the modelled tokens (dB)")
    ax.set_ylabel("prior's held-out NLL (bits per image), lower is easier to model")
    ax.grid(True, alpha=0.3)
    figure.suptitle("Modelability against reconstruction quality")
    return _save(figure, path)


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
    """Short enough for a 64-pixel column: k for the 1D tokenizer, name:tokens for the others."""
    if row.family == "1d":
        return f"k={row.k}" if one_1d else f"{row.name}:{row.k}"
    return f"{row.name}:{row.tokens_per_image:g}"


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
