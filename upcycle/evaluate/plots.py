"""PNG plots of the report. matplotlib (a dependency) is imported only here, when plotting, with Figure objects
rather than pyplot so that no GUI backend or global state is involved."""

from __future__ import annotations

from pathlib import Path

from upcycle.core.errors import UnsupportedError


def _figure(w: float, h: float):
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib.figure import Figure
    except ImportError:
        raise UnsupportedError("plots need matplotlib, which this installation lacks: pip install matplotlib "
                               "(or pass --no-plots)") from None
    return Figure(figsize=(w, h), dpi=110, layout="constrained")


def expert_load(layers: list[int], load: list[list[float]], path: Path) -> Path:
    """Heatmap layers x experts of load x E (1 = the uniform share; 0 = a dead expert)."""
    import numpy as np

    m = np.array([[x * len(row) for x in row] for row in load])
    E = m.shape[1]
    fig = _figure(min(2 + 0.45 * E, 16), min(1.5 + 0.3 * len(layers), 14))
    ax = fig.add_subplot()
    vmax = max(2.0, float(m.max()))
    im = ax.imshow(m, aspect="auto", cmap="RdBu_r", norm=_two_slope(vmax))
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_yticks(range(len(layers)), [str(i) for i in layers] if len(layers) <= 40 else None)
    if E <= 64:
        ax.set_xticks(range(E))
    if E * len(layers) <= 400:
        for i in range(len(layers)):
            for j in range(E):
                ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=6)
    ax.set_title("expert load / uniform share (1 = balanced)")
    fig.colorbar(im, ax=ax)
    fig.savefig(path)
    return path


def _two_slope(vmax: float):
    from matplotlib.colors import TwoSlopeNorm

    return TwoSlopeNorm(vcenter=1.0, vmin=0.0, vmax=vmax)


def loss_comparison(model_loss: list[float], parent_loss: list[float] | None, names: tuple[str, str],
                    path: Path) -> Path:
    """Left: mean loss with 95% interval per model. Right: block by block, model against parent."""
    from upcycle.evaluate.stats import mean_ci

    fig = _figure(9 if parent_loss else 4.5, 3.6)
    axes = fig.subplots(1, 2 if parent_loss else 1, squeeze=False)[0]
    ests = [mean_ci(model_loss)] + ([mean_ci(parent_loss)] if parent_loss else [])
    labels = [names[0]] + ([names[1]] if parent_loss else [])
    err = [[e.mean - e.low if e.low is not None else 0 for e in ests], [e.high - e.mean if e.high is not None else 0
                                                                         for e in ests]]
    ax = axes[0]
    ax.bar(range(len(ests)), [e.mean for e in ests], yerr=err, capsize=6, color=["tab:orange", "tab:blue"][:len(ests)])
    ax.set_xticks(range(len(ests)), labels)
    ax.set_ylabel("held-out loss (nats/token)")
    lo = min(e.low if e.low is not None else e.mean for e in ests)
    hi = max(e.high if e.high is not None else e.mean for e in ests)
    pad = max(0.05 * (hi - lo), 0.02 * hi, 1e-3)
    ax.set_ylim(max(0.0, lo - 10 * pad), hi + 3 * pad)
    ax.set_title("loss, 95% interval over blocks")
    if parent_loss:
        ax = axes[1]
        ax.scatter(parent_loss, model_loss, s=8, alpha=0.7)
        a, b = min(parent_loss + model_loss), max(parent_loss + model_loss)
        ax.plot([a, b], [a, b], color="gray", lw=1, ls="--")
        ax.set_xlabel(f"{names[1]} loss per block")
        ax.set_ylabel(f"{names[0]} loss per block")
        ax.set_title("below the diagonal: the model is better")
    fig.savefig(path)
    return path


def routing_overview(layers: list[int], cv: list[float], entropy_norm: list[float | None],
                     drop1: list[float], drop125: list[float], drift_mean: list[float | None],
                     drift_min: list[float | None], drift_reference: str | None, path: Path) -> Path:
    """Per layer: load imbalance, router entropy, capacity drops and expert drift."""
    from matplotlib.ticker import MaxNLocator

    fig = _figure(10, 6)
    (a, b), (c, d) = fig.subplots(2, 2)
    a.plot(layers, cv, marker="o")
    a.set_title("load coefficient of variation (0 = balanced)")
    if any(x is not None for x in entropy_norm):
        b.plot(layers, [x if x is not None else float("nan") for x in entropy_norm], marker="o")
    b.set_ylim(0, 1.05)
    b.set_title("router entropy / log E (1 = undecided)")
    c.plot(layers, drop1, marker="o", label="capacity 1.0")
    c.plot(layers, drop125, marker="o", label="capacity 1.25")
    c.set_title("share of assignments dropped")
    c.legend()
    if any(x is not None for x in drift_mean):
        d.plot(layers, [x if x is not None else float("nan") for x in drift_mean], marker="o", label="mean")
        d.plot(layers, [x if x is not None else float("nan") for x in drift_min], marker="o", label="min")
        d.legend()
    d.set_title(f"expert cosine to {'parent MLP' if drift_reference == 'parent' else 'mean expert'}")
    a.set_ylim(bottom=0)
    c.set_ylim(bottom=0)
    d.set_ylim(top=1.01)
    d.ticklabel_format(axis="y", useOffset=False)
    for ax in (a, b, c, d):
        ax.set_xlabel("layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.savefig(path)
    return path


def training_curves(run, path: Path) -> Path:
    """Loss (and validation loss), auxiliary losses and learning rate of a training run over steps."""
    fig = _figure(11, 3.6)
    a, b, c = fig.subplots(1, 3)
    xs, ys = run.series("loss")
    a.plot(xs, ys, lw=0.8, alpha=0.6, label="train loss")
    if len(ys) >= 20:
        w = max(2, len(ys) // 20)
        smooth = [sum(ys[max(0, i - w + 1):i + 1]) / len(ys[max(0, i - w + 1):i + 1]) for i in range(len(ys))]
        a.plot(xs, smooth, lw=1.5, label=f"train loss (mean of {w})")
    vx, vy = run.series("val_loss")
    if vy:
        a.plot(vx, vy, marker="o", label="val loss")
    a.set_title("loss")
    a.legend()
    for key in ("aux_loss", "z_loss"):
        kx, ky = run.series(key)
        if ky:
            b.plot(kx, ky, label=key)
    b.set_title("router losses")
    if b.get_legend_handles_labels()[0]:
        b.legend()
    lx, ly = run.series("lr")
    c.plot(lx, ly)
    c.set_title("learning rate")
    for ax in (a, b, c):
        ax.set_xlabel("step")
    fig.savefig(path)
    return path


def domain_usage(domain, path: Path) -> Path:
    """Heatmap layers x experts of domain load / general load (above 1: the domain uses the expert more)."""
    import numpy as np

    m = np.array([[r if r is not None else np.nan for r in d.ratio] for d in domain], dtype=float)
    m = np.where(np.isinf(m), np.nan, m)
    fig = _figure(min(2 + 0.45 * m.shape[1], 16), min(1.5 + 0.3 * len(domain), 14))
    ax = fig.add_subplot()
    vmax = max(2.0, float(np.nanmax(m)) if np.isfinite(m).any() else 2.0)
    im = ax.imshow(m, aspect="auto", cmap="PuOr_r", norm=_two_slope(vmax))
    for i, d in enumerate(domain):
        for e in d.selected:
            ax.text(e, i, "*", ha="center", va="center", fontsize=10)
    ax.set_yticks(range(len(domain)), [str(d.layer) for d in domain] if len(domain) <= 40 else None)
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_title("domain load / general load (* selected for training)")
    fig.colorbar(im, ax=ax)
    fig.savefig(path)
    return path
