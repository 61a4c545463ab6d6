"""``memlab report``: the store -> ``index.html`` (tables + PNG plots) and ``results.md``.

The report is assembled from sections. Each run kind (``bench/jobs``) builds the sections for its
own runs (MQAR: the recall-memory frontier, accuracy vs length, throughput); this module adds the
failed runs with their errors and the environments the numbers came from, and renders everything
twice: HTML for reading, markdown for pasting into docs. Plots use matplotlib's Agg canvas
directly (no pyplot state, no display needed).
"""

from __future__ import annotations

import html
import itertools
import math
import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from memlab.bench.store import RunRecord, Store


# -- formatting -----------------------------------------------------------------------------
def format_value(value: Any) -> str:
    """Numbers with 4 significant digits, None as a dash, everything else as str."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.4g}"
    return str(value)


def format_bytes(n: float | None) -> str:
    """Bytes in binary units with 3 significant digits: 1536 -> '1.5 KiB'."""
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} B" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


# -- report model ---------------------------------------------------------------------------
@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[Any]]
    note: str = ""


@dataclass
class Figure:
    """A PNG written into the report folder; ``path`` is its file name there."""

    path: str
    title: str
    caption: str = ""


@dataclass
class ReportSection:
    title: str
    text: str = ""
    tables: list[Table] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    # HTML-only collapsible blocks (summary, preformatted body), e.g. full tracebacks.
    details: list[tuple[str, str]] = field(default_factory=list)


# -- plotting -------------------------------------------------------------------------------
@dataclass
class Series:
    """One curve. Series with the same ``key`` share a color across panels; ``label`` None
    keeps it out of the legend (a second series of the same key)."""

    key: str
    x: list[float]
    y: list[float]
    label: str | None = None
    line: bool = True
    marker: str = "o"


@dataclass
class Panel:
    title: str
    xlabel: str
    ylabel: str
    series: list[Series]
    xlog: bool = False
    ylog: bool = False
    xbase: int = 10
    ylim: tuple[float, float] | None = None
    # Grouped bars instead of lines: each series' x values are category names (one group per
    # category, one bar per series in it).
    bars: bool = False


def save_panels(path: Path, panels: list[Panel], *, suptitle: str = "", ncols: int = 3) -> None:
    """Draw panels on a grid and save a PNG (Agg canvas, no display)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure as MplFigure
    from matplotlib.ticker import NullFormatter

    if not panels:
        raise ValueError(f"no panels to draw for {path}")
    ncols = min(ncols, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig = MplFigure(figsize=(4.6 * ncols, 3.6 * nrows + (0.4 if suptitle else 0)), layout="constrained")
    FigureCanvasAgg(fig)
    keys = sorted({s.key for p in panels for s in p.series})
    palette = [f"C{i}" for i in range(10)]
    markers = "os^Dv<>ph*"
    # Shapes and sizes cycle with colors so that coinciding points (e.g. two mixers computing
    # the same function) stay visible as two different markers.
    style = {
        k: (palette[i % 10], markers[i % len(markers)], 10.0 - 1.5 * (i % 4)) for i, k in enumerate(keys)
    }
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax, panel in itertools.zip_longest(axes.flat, panels):
        if panel is None:
            ax.set_visible(False)
            continue
        if panel.bars:
            categories = list(dict.fromkeys(x for s in panel.series for x in s.x))
            width = 0.8 / len(panel.series)
            for j, s in enumerate(panel.series):
                pos = [categories.index(x) - 0.4 + width * (j + 0.5) for x in s.x]
                ax.bar(pos, s.y, width=width, color=style[s.key][0], label=s.label)
            ax.set_xticks(range(len(categories)), categories, rotation=30, ha="right")
        for s in [] if panel.bars else panel.series:
            color, marker, size = style[s.key]
            ax.plot(
                s.x,
                s.y,
                color=color,
                marker=marker if s.marker else None,
                linestyle="-" if s.line else "none",
                label=s.label,
                alpha=0.95 if s.line else 0.55,
                markersize=size,
                # Hollow markers of different sizes: a point drawn over another stays visible.
                markerfacecolor="none",
                markeredgewidth=1.5,
            )
        if panel.xlog:
            ax.set_xscale("log", base=panel.xbase)
            # Minor-tick labels of a log axis collide; powers of two (lengths, widths) read best
            # as plain numbers placed at the measured values.
            ax.xaxis.set_minor_formatter(NullFormatter())
            if panel.xbase == 2:
                ticks = sorted({x for s in panel.series for x in s.x})
                ax.set_xticks(
                    ticks, [format_value(int(t)) if float(t).is_integer() else format_value(t) for t in ticks]
                )
        if panel.ylog:
            ax.set_yscale("log")
        if panel.ylim is not None:
            ax.set_ylim(*panel.ylim)
        ax.set_title(panel.title, fontsize=10)
        ax.set_xlabel(panel.xlabel)
        ax.set_ylabel(panel.ylabel)
        ax.grid(True, which="both", alpha=0.3)
    handles: dict[str, Any] = {}
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(lab, h)
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="outside right upper", fontsize=8)
    if suptitle:
        fig.suptitle(suptitle)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points not beaten by a smaller-or-equal x with a higher y, sorted by x.

    The recall-memory frontier: the best accuracy reachable with at most that much state.
    """
    front: list[tuple[float, float]] = []
    best = -math.inf
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if y > best:
            front.append((x, y))
            best = y
    return front


# -- rendering ------------------------------------------------------------------------------
def _md_cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def table_markdown(table: Table) -> str:
    lines = [f"**{table.title}**", ""] if table.title else []
    if not table.rows:
        return "\n".join([*lines, "(none)", ""])
    lines.append("| " + " | ".join(_md_cell(c) for c in table.columns) + " |")
    lines.append("|" + "|".join("---" for _ in table.columns) + "|")
    for row in table.rows:
        lines.append(
            "| " + " | ".join(_md_cell(format_value(v) if not isinstance(v, str) else v) for v in row) + " |"
        )
    if table.note:
        lines += ["", table.note]
    return "\n".join(lines) + "\n"


def table_html(table: Table) -> str:
    parts = [f"<h3>{html.escape(table.title)}</h3>"] if table.title else []
    if not table.rows:
        return "".join(parts) + "<p>(none)</p>"
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in table.columns)
    body = "".join(
        "<tr>"
        + "".join(f"<td>{html.escape(v if isinstance(v, str) else format_value(v))}</td>" for v in row)
        + "</tr>"
        for row in table.rows
    )
    parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
    if table.note:
        parts.append(f"<p class='note'>{html.escape(table.note)}</p>")
    return "".join(parts)


_CSS = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222;padding:0 1em}
table{border-collapse:collapse;margin:0.5em 0 1.5em;font-size:13px}
th,td{border:1px solid #ccc;padding:3px 7px;text-align:right}
th{background:#f3f3f3} td:first-child,th:first-child{text-align:left}
img{max-width:100%;border:1px solid #eee;margin:0.5em 0}
pre{background:#f7f7f7;padding:0.7em;overflow-x:auto;font-size:12px}
.note{color:#555;font-size:13px} h2{border-bottom:1px solid #ddd;padding-bottom:0.2em;margin-top:2em}
"""


def render_markdown(title: str, intro: str, sections: list[ReportSection]) -> str:
    out = [f"# {title}", "", intro, ""]
    for sec in sections:
        out += [f"## {sec.title}", ""]
        if sec.text:
            out += [sec.text, ""]
        for fig in sec.figures:
            out += [f"![{fig.title}]({fig.path})", ""]
            if fig.caption:
                out += [f"*{fig.caption}*", ""]
        for table in sec.tables:
            out += [table_markdown(table)]
    return "\n".join(out).rstrip() + "\n"


def render_html(title: str, intro: str, sections: list[ReportSection]) -> str:
    out = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1><p>{html.escape(intro)}</p>",
    ]
    if len(sections) > 1:
        links = "".join(
            f"<li><a href='#s{i}'>{html.escape(s.title)}</a></li>" for i, s in enumerate(sections)
        )
        out.append(f"<ul>{links}</ul>")
    for i, sec in enumerate(sections):
        out.append(f"<h2 id='s{i}'>{html.escape(sec.title)}</h2>")
        if sec.text:
            out += [f"<p>{html.escape(p)}</p>" for p in sec.text.split("\n\n")]
        for fig in sec.figures:
            out.append(
                f"<figure><img src='{html.escape(fig.path)}' alt='{html.escape(fig.title)}'>"
                f"<figcaption class='note'>{html.escape(fig.caption or fig.title)}</figcaption></figure>"
            )
        out += [table_html(t) for t in sec.tables]
        for summary, body in sec.details:
            out.append(
                f"<details><summary>{html.escape(summary)}</summary><pre>{html.escape(body)}</pre></details>"
            )
    out.append("</body></html>")
    return "\n".join(out)


# -- shared sections ------------------------------------------------------------------------
def failures_section(records: list[RunRecord], store: Store) -> ReportSection:
    """Failed runs with their error, and runs that never finished (interrupted or killed)."""
    failed = [r for r in records if r.status == "failed"]
    unfinished = [
        r for r in records if r.status == "interrupted" or (r.status == "running" and store.is_stale(r))
    ]
    running = [r for r in records if r.status == "running" and not store.is_stale(r)]
    rows = [[r.suite, r.section, r.name, r.status, r.error_line, r.id] for r in failed + unfinished]
    text = (
        f"{len(failed)} failed, {len(unfinished)} interrupted or killed (re-run by the next `memlab run`), "
        f"{len(running)} running now."
    )
    return ReportSection(
        title="Failed and unfinished runs",
        text=text,
        tables=[Table(title="", columns=["suite", "section", "run", "status", "error", "id"], rows=rows)],
        details=[(f"{r.name} ({r.id})", r.error or "") for r in failed + unfinished if r.error],
    )


def environment_section(records: list[RunRecord]) -> ReportSection:
    """Which code, packages and devices the finished runs used."""
    counts: Counter[tuple[str, ...]] = Counter()
    for r in records:
        if r.status != "done" or not r.env:
            continue
        v = r.env.get("versions", {})
        counts[
            (
                str(r.env.get("git_sha")),
                str(r.env.get("device_name")),
                str(v.get("torch")),
                str(v.get("triton")),
                str(v.get("transformers")),
                str(v.get("memlab")),
            )
        ] += 1
    rows = [[*k, n] for k, n in sorted(counts.items())]
    cols = ["git sha", "device", "torch", "triton", "transformers", "memlab", "runs"]
    return ReportSection(title="Environment", tables=[Table(title="", columns=cols, rows=rows)])


@dataclass
class ReportPaths:
    index: Path
    markdown: Path
    figures: list[Path]


def write_report(
    store_path: str | os.PathLike[str], out_dir: str | os.PathLike[str], *, suite: str | None = None
) -> ReportPaths:
    """Read every run in the store (or one suite's) and write the HTML and markdown report."""
    from memlab.bench.jobs import JOBS, Job  # late: the job modules import this module

    store_path = Path(store_path)
    if not store_path.is_file():
        raise ValueError(f"store {str(store_path)!r} does not exist; run `memlab run SUITE` first")
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # --out names a file, or a folder below one: bad input, not a crash
        raise ValueError(f"report folder {str(out)!r} cannot be created: {exc}") from exc
    with Store(store_path) as store:
        records = store.records(suite=suite)
        if suite is not None and not records:
            raise ValueError(f"suite {suite!r} has no runs in {str(store_path)!r}; it has {store.suites()}")
        groups: dict[tuple[str, str, str], list[RunRecord]] = defaultdict(list)
        for r in records:
            groups[(r.suite, r.section, r.job)].append(r)
        sections: list[ReportSection] = []
        for (suite_name, section, job_name), recs in sorted(groups.items()):
            job = JOBS.get(job_name)() if job_name in JOBS else Job()
            prefix = _safe(f"{suite_name}_{section}_")
            for sec in job.report(recs, out, prefix):
                sec.title = f"{suite_name} / {section}: {sec.title}"
                sections.append(sec)
        sections.append(failures_section(records, store))
    sections.append(environment_section(records))
    n_done = sum(r.status == "done" for r in records)
    intro = f"{n_done} finished runs of {len(records)} in {store_path}" + (
        f" (suite {suite})" if suite else ""
    )
    title = "memlab report"
    md_path, html_path = out / "results.md", out / "index.html"
    md_path.write_text(render_markdown(title, intro, sections))
    html_path.write_text(render_html(title, intro, sections))
    figures = [out / f.path for s in sections for f in s.figures]
    return ReportPaths(index=html_path, markdown=md_path, figures=figures)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
