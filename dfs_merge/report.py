"""`dfs-merge report RUN_DIR`: one self-contained HTML page of a run folder, for a browser, with no network.

The page reads what a run writes (config.yaml, evals.jsonl, checkpoint.json, best.genome.yaml, pareto.json
and pareto/, sources.json) and changes none of it, so it works on a finished run, on one still going (the
run itself rewrites `report.html` at each checkpoint, see `LiveReport`) and on one killed mid-generation:
a truncated last line of evals.jsonl is skipped (not cut off, as a resume does), and evaluations newer than
the checkpoint, or with no checkpoint at all, are shown as the generation in progress.

It shows the best and mean score per generation; the Pareto front (score vs hops; for a single-objective run
every evaluation, and for a recipe run, whose hops never change, score per generation) with each point's
route and per-task metrics on hover; the best routes or recipes drawn by `dfs_merge.plots` as inline PNGs;
every evaluation in a table that sorts (click a heading) and filters (vanilla JS); the validation and
held-out tables; the elapsed time and an estimate of the time left; the config.

Plots: plotly.js from the `plotly` package's offline bundle, inlined in the page. Hovering a point to read its
route and metrics, and zooming into a crowded front, are what a person looks at these plots for; matplotlib's
SVG would be smaller but static. The price is size: the bundle is about 4.8 MB of each page. The figures are
plain JSON written here and drawn by plotly.js in the browser, so writing a report costs no plotting in Python
beyond the route pictures. The page's template (its HTML, style sheet and table script) is package data in
`dfs_merge/report_page/`.
"""

from __future__ import annotations

import base64
import datetime
import html
import json
import math
import os
import stat
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dfs_merge.atomic import write_atomic
from dfs_merge.errors import DfsMergeError, ReportError, one_line
from dfs_merge.evaluation import WORST_SCORE
from dfs_merge.inputs import MAX_BYTES, MAX_LOG_BYTES, parse_json, parse_yaml, read_bytes

if TYPE_CHECKING:
    from dfs_merge.genome_files import CandidateGenome

REPORT_NAME = "report.html"
MAX_PICTURES = 6  # the best genome, then front members by hop count
SLOW_S = 1.0  # a live report slower than this to write follows the history.png schedule
SHARE = 0.1  # nor may rewriting it take more than this share of the run's time (a run of quick generations)


@dataclass
class RunFiles:
    """What a run folder holds, read tolerantly: a missing or unreadable file is None (and a note)."""

    path: Path
    config_text: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    evals: list[dict[str, Any]] = field(default_factory=list)
    checkpoint: dict[str, Any] | None = None
    best: dict[str, Any] | None = None
    pareto: list[dict[str, Any]] = field(default_factory=list)
    sources: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    updated: float | None = None  # the newest modification time of the run's files


def _read_bytes(path: Path, notes: list[str], limit: int) -> bytes | None:
    """A run file's bytes, read through `dfs_merge.inputs`: None when it is missing (silently) or cannot be read
    (a note). A pipe, device or socket (reading it could block or never end) or a file over `limit` is a
    `ReportError`, as a resume refuses it: a page that left it out would look like a complete run."""
    if not os.path.lexists(path):
        return None
    try:
        return read_bytes(path, ReportError, limit=limit)
    except ReportError as err:
        try:
            st = os.stat(path)
        except OSError:  # a link to nothing
            st = None
        if st is not None and not stat.S_ISDIR(st.st_mode) and (not stat.S_ISREG(st.st_mode) or st.st_size > limit):
            raise
        notes.append(f"{path.name} could not be read ({str(err).removeprefix(f'{path}: ')})")
        return None


def _read_evals(path: Path, notes: list[str]) -> list[dict[str, Any]]:
    """The complete lines of evals.jsonl; a partial last line (a write still going, or killed) is skipped."""
    data = _read_bytes(path, notes, MAX_LOG_BYTES)
    if data is None:
        return []
    end = data.rfind(b"\n") + 1
    if end < len(data):
        notes.append(f"{path.name} ends in a partial line ({len(data) - end} bytes, an evaluation being written "
                     "or a killed write): skipped")
    records, bad = [], 0
    for line in data[:end].splitlines():
        if not line.strip():
            continue
        try:
            rec = parse_json(line, ReportError)  # nesting beyond MAX_DEPTH refused before json recurses
        except ReportError:
            bad += 1
            continue
        if isinstance(rec, dict):
            records.append(rec)
        else:
            bad += 1
    if bad:
        notes.append(f"{path.name}: {bad} line(s) that are not JSON records: skipped")
    return records


def _read_file(path: Path, notes: list[str], parse: Callable[[str, str], Any]) -> Any:
    """A file parsed (`parse(text, label)`), or None when it is missing (silently) or unreadable (with a note)."""
    data = _read_bytes(path, notes, MAX_BYTES)
    if data is None:
        return None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        notes.append(f"{path.name} could not be read (not UTF-8 text: {one_line(err, 120)})")
        return None
    return _parse(text, path.name, notes, parse)


def _parse(text: str, name: str, notes: list[str], parse: Callable[[str, str], Any]) -> Any:
    """`parse(text, name)`, or None with a note when it is refused."""
    try:
        return parse(text, name)
    except ReportError as err:
        notes.append(f"{name} could not be read ({str(err).removeprefix(f'{name}: ')})")
        return None


def _as_text(text: str, label: str) -> str:
    return text


def _yaml(text: str, label: str) -> Any:
    return parse_yaml(text, ReportError, label)  # aliases and repeated keys refused, as the run's own reader does


def _json(text: str, label: str) -> Any:
    return parse_json(text, ReportError, label)


def read_run(run_dir: str | Path) -> RunFiles:
    """Read a run folder; a path that is no folder, or a folder with neither config.yaml nor evals.jsonl, is a
    `ReportError`."""
    from dfs_merge.search.rundir import RunDir

    rd = RunDir(run_dir)
    if not rd.path.is_dir():
        raise ReportError(f"{rd.path}: not a folder (give the run folder, the config's out:)")
    if not rd.config.is_file() and not rd.evals.is_file():
        raise ReportError(f"{rd.path}: not a run folder (it has neither config.yaml nor evals.jsonl)")
    run = RunFiles(rd.path)
    run.config_text = _read_file(rd.config, run.notes, _as_text)
    config = _parse(run.config_text, rd.config.name, run.notes, _yaml) if run.config_text else None
    run.config = config if isinstance(config, dict) else {}
    run.evals = _read_evals(rd.evals, run.notes)
    checkpoint = _read_file(rd.checkpoint, run.notes, _json)
    run.checkpoint = checkpoint if isinstance(checkpoint, dict) else None
    best = _read_file(rd.best, run.notes, _yaml)
    run.best = best if isinstance(best, dict) else None
    pareto = _read_file(rd.pareto_json, run.notes, _json)
    run.pareto = [r for r in pareto if isinstance(r, dict)] if isinstance(pareto, list) else []
    sources = _read_file(rd.sources, run.notes, _json)
    run.sources = [s for s in sources if isinstance(s, dict)] if isinstance(sources, list) else []
    times = [p.stat().st_mtime for p in (rd.evals, rd.checkpoint, rd.config) if p.is_file()]
    run.updated = max(times) if times else None
    return run


# ---------------------------------------------------------------------------------------------- the data


def _genome(data: object, where: str) -> CandidateGenome | None:
    """A genome or recipe from its mapping, or None when it is not one."""
    from dfs_merge.genome_files import genome_from_dict

    if not isinstance(data, dict):
        return None
    try:
        return genome_from_dict(data, where)
    except DfsMergeError:
        return None


def _text(genome: Any) -> str:
    """A genome mapping's route text (a recipe's one-line text)."""
    if isinstance(genome, dict) and genome.get("format") == "dfs-merge/genome@1" and genome.get("route"):
        return str(genome["route"])
    g = _genome(genome, "evals.jsonl")
    return g.text() if g is not None else "?"


def _dict(x: Any) -> dict[str, Any]:
    return x if isinstance(x, dict) else {}


def _num(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def _wrap(text: str, width: int = 72) -> str:
    """Plotly hover text: `text` escaped and broken at spaces into lines of about `width` characters."""
    lines, line = [], ""
    for word in text.split(" "):
        if line and len(line) + len(word) + 1 > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    lines.append(line)
    return "<br>".join(html.escape(x) for x in lines)


@dataclass
class EvalRow:
    """One evaluation of the table and the plots."""

    index: int
    generation: int | None
    key: str
    text: str
    hops: int | None
    score: float | None
    tasks: dict[str, dict[str, Any]]
    seconds: float | None
    error: str | None

    @property
    def ok(self) -> bool:
        return self.error is None and self.score is not None and self.score > WORST_SCORE


def _rows(records: Sequence[dict[str, Any]]) -> list[EvalRow]:
    rows = []
    for i, rec in enumerate(records, start=1):
        ev = _dict(rec.get("evaluation"))
        tasks: dict[str, dict[str, Any]] = {}
        for name, value in _dict(rec.get("tasks")).items():
            tasks[name] = {"value": _num(value)}
        for name, t in _dict(ev.get("tasks")).items():
            if isinstance(t, dict):
                tasks[name] = {"value": _num(t.get("value")), "metric": t.get("metric"), "docs": t.get("docs"),
                               "higher_is_better": t.get("higher_is_better")}
        gen = rec.get("generation")
        hops = rec.get("hops", ev.get("hops"))
        error = _error(rec.get("error", ev.get("error")))
        race = _dict(ev.get("race"))
        if error is None and isinstance(race.get("dropped"), int):  # no full score: the documents it got
            partial = _num(race.get("partial"))
            error = (f"stopped by the race after stage {race['dropped'] + 1}"
                     + (f" (score {partial:.4f} on those documents)" if partial is not None else ""))
        rows.append(EvalRow(i, gen if isinstance(gen, int) else None, str(rec.get("key", "?")), _text(rec.get("genome")),
                        hops if isinstance(hops, int) else None, _num(rec.get("score", ev.get("score"))), tasks,
                        _num(rec.get("seconds", ev.get("seconds"))), error))
    return rows


def _error(x: Any) -> str | None:
    return None if x is None else str(x)


def _task_names(config: dict[str, Any], evals: Sequence[dict[str, Any]]) -> list[str]:
    """The tasks in the config's order, then any other a result names."""
    names = list(config.get("tasks") or {}) if isinstance(config.get("tasks"), dict) else []
    for ev in evals:
        for name in _dict(ev.get("tasks")):
            if name not in names:
                names.append(name)
    return names


def _metrics(rows: Sequence[EvalRow], tasks: Sequence[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for r in rows:
        for t in tasks:
            if t not in out and r.tasks.get(t, {}).get("metric"):
                out[t] = str(r.tasks[t]["metric"])
    return out


def _fmt(x: float | None, digits: int = 4) -> str:
    return "" if x is None else f"{x:.{digits}f}"


def _hover(r: EvalRow, tasks: Sequence[str], metrics: dict[str, str]) -> str:
    lines = [f"<b>{_wrap(r.text)}</b>",
             f"score {_fmt(r.score)}, {r.hops} hops, generation {r.generation}, #{r.index}"]
    for t in tasks:
        res = r.tasks.get(t)
        if res and res.get("value") is not None:
            docs = f" ({res['docs']} docs)" if res.get("docs") is not None else ""
            lines.append(html.escape(f"{t} {metrics.get(t, '')}: {res['value']:.4f}{docs}"))
    if r.error:
        lines.append("error: " + _wrap(str(r.error)))
    return "<br>".join(lines)


def _front_keys(run: RunFiles) -> list[str]:
    """The published front (pareto.json), else the checkpoint's."""
    if run.pareto:
        return [str(r.get("key")) for r in run.pareto]
    if run.checkpoint and isinstance(run.checkpoint.get("pareto"), list):
        return [str(e.get("key")) for e in run.checkpoint["pareto"] if isinstance(e, dict)]
    return []


def _history(run: RunFiles, rows: Sequence[EvalRow]) -> tuple[list[dict[str, Any]], list[dict[str, Any]], int]:
    """(the checkpoint's history, the generations logged after it, the last checkpointed generation)."""
    cp = run.checkpoint or {}
    history = [h for h in cp.get("history") or [] if isinstance(h, dict) and isinstance(h.get("generation"), int)]
    done = cp.get("generation") if isinstance(cp.get("generation"), int) else -1
    best = max((h["best"] for h in history if _num(h.get("best")) is not None), default=None)
    partial = []
    for g in sorted({r.generation for r in rows if r.generation is not None and r.generation > done}):
        scores = [r.score for r in rows if r.ok and r.generation == g and r.score is not None]
        before = [r.score for r in rows if r.ok and r.generation is not None and r.generation <= g and r.score is not None]
        so_far = max([*before, *([best] if best is not None else [])], default=None)
        partial.append({"generation": g, "best": so_far, "mean": sum(scores) / len(scores) if scores else None,
                        "gen_best": max(scores, default=None), "evaluated": sum(1 for r in rows if r.generation == g)})
    return history, partial, done


def _duration(s: float) -> str:
    s = int(round(s))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def _timing(run: RunFiles, rows: Sequence[EvalRow], history: Sequence[dict[str, Any]], done: int) -> dict[str, str]:
    """Status, elapsed time and the estimate of the time left, as words."""
    cfg, cp = run.config, run.checkpoint or {}
    total = cfg.get("generations") if isinstance(cfg.get("generations"), int) else None
    workers = cfg.get("workers") if isinstance(cfg.get("workers"), int) and cfg.get("workers") > 0 else 1
    gen_seconds = [float(h["seconds"]) for h in history if _num(h.get("seconds")) is not None]
    pending = [r for r in rows if r.generation is not None and r.generation > done]
    pending_s = sum(r.seconds or 0.0 for r in pending) / workers  # evaluation time: a lower bound on wall time
    elapsed = sum(gen_seconds) + pending_s
    out = {"elapsed": _duration(elapsed) + " of search" + (" (generation in progress counted by its evaluations)"
                                                            if pending else "")}
    if cp.get("finished"):
        out["status"] = "finished"
        out["left"] = "none: the run is finished"
        return out
    gens = f" of {total}" if total is not None else ""
    status = f"generation {done}{gens} checkpointed" if done >= 0 else "no generation checkpointed yet"
    if pending:
        first, last = min(r.generation or 0 for r in pending), max(r.generation or 0 for r in pending)
        gens_text = f"generation {last}" if first == last else f"generations {first}-{last}"
        status += f"; {len(pending)} evaluation(s) of {gens_text} logged since"
    out["status"] = status + " (running, or stopped: `dfs-merge evolve CONFIG --resume` continues it)"
    if total is None:
        out["left"] = "unknown (no generations in config.yaml)"
        return out
    left_gens = total - done
    if gen_seconds:
        per_gen = sum(gen_seconds) / len(gen_seconds)
        basis = f"{_duration(per_gen)} per generation so far"
    elif rows:
        pop = cfg.get("population") if isinstance(cfg.get("population"), int) else len(rows)
        per_gen = sum(r.seconds or 0.0 for r in rows) / len(rows) * pop / workers
        basis = "from the evaluations logged so far (no generation finished yet)"
    else:
        out["left"] = "unknown (nothing evaluated yet)"
        return out
    if left_gens <= 0:
        out["left"] = "the generations are done; the final choice and held-out scoring remain"
        return out
    left = max(0.0, left_gens * per_gen - pending_s)
    out["left"] = (f"about {_duration(left)} for {left_gens} more generation(s) ({basis}), plus the final choice "
                   "and held-out scoring")
    return out


def _pictures(run: RunFiles, front: Sequence[str], cache: dict[str, str] | None = None) -> list[dict[str, str]]:
    """The best genome and the front's members drawn by `dfs_merge.plots`, as PNG data URIs; `cache` (genome key ->
    data URI) keeps the pictures drawn for an earlier report of the same run."""
    from dfs_merge.merging.recipe import Recipe
    from dfs_merge.plots import recipe_png, route_png

    todo: list[tuple[str, CandidateGenome]] = []
    best = _genome(run.best, "best.genome.yaml")
    if best is not None:
        todo.append(("best", best))
    by_file = {str(r.get("key")): r.get("file") for r in run.pareto}
    cp_front = {str(e.get("key")): e.get("genome") for e in (run.checkpoint or {}).get("pareto") or []
                if isinstance(e, dict)}
    for key in front:
        if len(todo) >= MAX_PICTURES or (best is not None and key == best.key()):
            continue
        g = None
        if isinstance(by_file.get(key), str):
            g = _genome(_read_file(run.path / by_file[key], [], _yaml), by_file[key])
        if g is None:
            g = _genome(cp_front.get(key), "checkpoint")
        if g is not None:
            todo.append(("front", g))
    cache = {} if cache is None else cache
    out = []
    with tempfile.TemporaryDirectory(prefix="dfs-report-") as tmp:
        for i, (role, g) in enumerate(todo):
            recipe = isinstance(g, Recipe)
            png = Path(tmp) / f"{i}.png"
            if g.key() not in cache:
                try:
                    recipe_png(g, png) if isinstance(g, Recipe) else route_png(g, png)
                    cache[g.key()] = "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode("ascii")
                except (OSError, ValueError, DfsMergeError) as err:
                    run.notes.append(f"the picture of {g.key()} could not be drawn ({one_line(err, 160)})")
                    continue
            uri = cache[g.key()]
            hops = len(g.decode())
            title = ("best" if role == "best" else "front member") + ("" if recipe else f", {hops} hops")
            scores = g.scores.get("dev", {}) if isinstance(g.scores, dict) else {}
            if _num(scores.get("score")) is not None:
                title += f", dev score {scores['score']:.4f}"
            out.append({"title": title, "uri": uri, "text": "\n".join(g.table()) if recipe else g.text(),
                        "kind": "recipe" if recipe else "route"})
    return out


def _split_table(evals: dict[str, Any], names: dict[str, str], what: str) -> str:
    """An HTML table of key -> evaluation mapping (the checkpoint's `val` or `report`)."""
    items = [(k, v) for k, v in evals.items() if isinstance(v, dict)]
    if not items:
        return ""
    tasks = _task_names({}, [v for _, v in items])
    metrics = {t: str(r.get("metric", "")) for _, v in items for t, r in _dict(v.get("tasks")).items()
               if isinstance(r, dict)}
    head = ["route / recipe", "hops", "score", *[f"{t} ({metrics.get(t, '')})" for t in tasks], "error"]
    body = []
    for key, v in sorted(items, key=lambda kv: -(_num(kv[1].get("score")) or -math.inf)):
        cells = [names.get(key, key), str(v.get("hops", "")), _fmt(_num(v.get("score")))]
        for t in tasks:
            res = _dict(v.get("tasks")).get(t)
            if isinstance(res, dict) and _num(res.get("value")) is not None:
                docs = f" ({res['docs']} docs)" if res.get("docs") is not None else ""
                cells.append(f"{res['value']:.4f}{docs}")
            else:
                cells.append("")
        cells.append(str(v.get("error") or ""))
        body.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    return (f"<h2>{html.escape(what)}</h2><table class='plain'><thead><tr>"
            + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr></thead><tbody>" + "".join(body)
            + "</tbody></table>")


def report_data(run: RunFiles, rows: Sequence[EvalRow]) -> dict[str, Any]:
    """Everything the page's script draws, as JSON-safe data: the figures' points and the table's cells."""
    cfg = run.config
    tasks = _task_names(cfg, run.evals)
    metrics = _metrics(rows, tasks)
    recipe = isinstance(cfg.get("merge"), dict) or any(
        isinstance(r.get("genome"), dict) and r["genome"].get("format") == "dfs-merge/recipe@1" for r in run.evals)
    objectives = cfg.get("objectives") if isinstance(cfg.get("objectives"), list) else ["score"]
    front = _front_keys(run)
    best_g = _genome(run.best, "best.genome.yaml")
    best_key = best_g.key() if best_g is not None else None
    ok = [r for r in rows if r.ok]
    if best_key is None and ok:
        best_key = max(ok, key=lambda r: r.score or 0.0).key
    history, partial, done = _history(run, rows)
    by_key = {r.key: r for r in rows}
    front_rows = sorted((by_key[k] for k in front if k in by_key), key=lambda r: (r.hops or 0, -(r.score or 0.0)))

    def points(rs: Sequence[EvalRow]) -> dict[str, list[Any]]:
        return {"x": [r.generation if recipe else r.hops for r in rs], "y": [r.score for r in rs],
                "text": [_hover(r, tasks, metrics) for r in rs], "generation": [r.generation for r in rs]}

    columns: list[dict[str, Any]] = [
        {"label": "#", "num": True}, {"label": "gen", "num": True}, {"label": "recipe" if recipe else "route"},
        {"label": "hops", "num": True}, {"label": "score", "num": True},
        *[{"label": f"{t} ({metrics[t]})" if t in metrics else t, "num": True} for t in tasks],
        {"label": "docs" + (f" ({' / '.join(tasks)})" if len(tasks) > 1 else ""), "num": True},
        {"label": "seconds", "num": True}, {"label": "error"},
    ]
    cells = []
    for r in rows:
        values: list[Any] = [r.index, r.generation, r.text, r.hops, r.score]
        shown = [str(r.index), "" if r.generation is None else str(r.generation), r.text,
                 "" if r.hops is None else str(r.hops), _fmt(r.score)]
        for t in tasks:
            v = r.tasks.get(t, {}).get("value")
            values.append(v)
            shown.append(_fmt(v))
        docs = [r.tasks.get(t, {}).get("docs") for t in tasks]
        known = [d for d in docs if isinstance(d, int)]
        values.append(sum(known) if known else None)
        shown.append(" / ".join("" if d is None else str(d) for d in docs) if known else "")
        values += [r.seconds, r.error or ""]
        shown += [_fmt(r.seconds, 2), r.error or ""]
        cls = " ".join(c for c, on in (("best", r.key == best_key), ("front", r.key in front), ("failed", not r.ok))
                       if on)
        cells.append({"v": values, "s": shown, "c": cls})
    best_row = by_key.get(best_key) if best_key else None
    return {
        "recipe": recipe,
        "front_run": "hops" in objectives or bool(front),
        "history": history,
        "partial": partial,
        "all": points(ok),
        "front": points(front_rows),
        "best": points([best_row] if best_row is not None and best_row.ok else []),
        "failed": len(rows) - len(ok),
        "columns": columns,
        "rows": cells,
    }


# ---------------------------------------------------------------------------------------------- the page


def _json_script(data: Any) -> str:
    """JSON that is safe inside a <script> element."""
    text = json.dumps(data, allow_nan=False, separators=(",", ":"))
    return text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")


def _dl(items: Sequence[tuple[str, str]]) -> str:
    return "<dl>" + "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(v)}</dd>" for k, v in items if v) + "</dl>"


def _page_file(name: str) -> str:
    """A file of the page's template, package data in `dfs_merge/report_page/`: the HTML (a `str.format`
    template), its style sheet and its script."""
    return (resources.files("dfs_merge") / "report_page" / name).read_text(encoding="utf-8")


def render(run: RunFiles, now: float | None = None, pictures: dict[str, str] | None = None) -> str:
    """The report page of a run, as one HTML document with its scripts, styles and pictures inline (`pictures`:
    see `_pictures`)."""
    from plotly import __version__ as plotly_version
    from plotly.offline import get_plotlyjs

    from dfs_merge.merging.recipe import Recipe

    cfg, cp = run.config, run.checkpoint or {}
    rows = _rows(run.evals)
    data = report_data(run, rows)
    history, _, done = _history(run, rows)
    timing = _timing(run, rows, history, done)
    front = _front_keys(run)
    best = _genome(run.best, "best.genome.yaml")
    names = {r.key: r.text for r in rows}
    if best is not None:
        names[best.key()] = best.text()
    counters = cp.get("counters") if isinstance(cp.get("counters"), dict) else {}
    sources = run.sources or [{"path": p} for p in cfg.get("sources") or []]
    stamp = datetime.datetime.fromtimestamp(now or time.time()).isoformat(sep=" ", timespec="seconds")
    updated = (datetime.datetime.fromtimestamp(run.updated).isoformat(sep=" ", timespec="seconds")
               if run.updated else "")
    best_line = ""
    if best is not None:
        dev = best.scores.get("dev", {}) if isinstance(best.scores, dict) else {}
        best_line = (f"{dev.get('score', float('nan')):.4f} dev" if _num(dev.get("score")) is not None else "?")
        for split in ("val", "test"):
            s = best.scores.get(split, {}) if isinstance(best.scores, dict) else {}
            if _num(s.get("score")) is not None:
                best_line += f", {s['score']:.4f} {split}"
        best_line += (": " if isinstance(best, Recipe) else f", {len(best.decode())} hops: ") + best.text()
    summary = _dl([
        ("status", timing.get("status", "")),
        ("elapsed", timing.get("elapsed", "")),
        ("time left", timing.get("left", "")),
        ("best", best_line),
        ("evaluations", f"{len(rows)} logged" + (f", {data['failed']} failed" if data["failed"] else "")
         + (f"; {counters.get('cache_hits', 0)} cache hits at the checkpoint" if counters else "")),
        ("algorithm", f"{cfg.get('algorithm', '?')}, population {cfg.get('population', '?')}, "
                      f"{cfg.get('generations', '?')} generations, objectives {', '.join(map(str, cfg.get('objectives') or []))}"
         + (f", merge {cfg['merge'].get('method')}" if isinstance(cfg.get("merge"), dict) else "")),
        ("tasks", ", ".join(f"{t} x {w}" for t, w in (cfg.get("tasks") or {}).items())
         if isinstance(cfg.get("tasks"), dict) else ""),
        ("sources", "; ".join(f"{i}: {s.get('path')}" + (f" ({s['fingerprint']})" if s.get("fingerprint") else "")
                              for i, s in enumerate(sources))),
        ("files last written", updated),
    ])
    pictures = "".join(
        f"<figure class='{p['kind']}'><img alt='{html.escape(p['title'])}' src='{p['uri']}'><figcaption><b>{html.escape(p['title'])}"
        f"</b><pre>{html.escape(p['text'])}</pre></figcaption></figure>" for p in _pictures(run, front, pictures))
    tables = (_split_table(_dict(cp.get("val")), names, "Validation (the final choice, select_tasks)")
              + _split_table(_dict(cp.get("report")), names, "Held out (report_tasks: chose nothing)"))
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in run.notes)
    front_title = ("Pareto front: score vs hops" if data["front_run"] else
                   "Every evaluation: score per generation" if data["recipe"] else "Every evaluation: score vs hops")
    return _page_file("page.html").format(
        title=html.escape(f"dfs-merge run {run.path.name or run.path}"),
        heading=html.escape(str(run.path)),
        stamp=html.escape(stamp),
        notes=f"<ul class='notes'>{notes}</ul>" if notes else "",
        summary=summary,
        front_title=html.escape(front_title),
        pictures=pictures or "<p>No best genome yet.</p>",
        tables=tables,
        config=html.escape(run.config_text or "(config.yaml is missing)"),
        style=_page_file("page.css"),
        plotly=get_plotlyjs(),
        plotly_version=html.escape(plotly_version),
        data=_json_script(data),
        script=_page_file("page.js"),
    )


def report_inputs(run_dir: str | Path) -> list[Path]:
    """The files a report reads (that an `--out` must not replace)."""
    from dfs_merge.search.rundir import RunDir

    paths = RunDir(run_dir).paths()
    return [p for name, p in paths.items() if name not in ("out", "report", "history")]


def default_output(run_dir: str | Path) -> Path:
    """Where a run's report goes: `report.html` in the run folder."""
    from dfs_merge.search.rundir import RunDir

    return RunDir(run_dir).report


def write_report(run_dir: str | Path, out: str | Path | None = None, *,
                 pictures: dict[str, str] | None = None) -> Path:
    """Write the report of the run in `run_dir` to `out` (default: `report.html` in the run folder) atomically;
    returns the file written. A folder that is not a run, or an output that cannot be written: `ReportError`.
    `pictures` caches the route pictures between reports of one run (see `_pictures`)."""
    run = read_run(run_dir)
    target = Path(out) if out is not None else default_output(run.path)
    page = render(run, pictures=pictures)
    try:
        write_atomic(target, page)
    except OSError as err:
        raise ReportError(f"{target}: the report cannot be written ({err.strerror or err})") from None
    return target


class LiveReport:
    """A running run's report.html, rewritten at each checkpoint (`refresh`).

    A failure is one warning line through `log` (repeated only when the reason changes) and never stops the run.
    When the last write took longer than `slow_s`, or more than `share` of the time since the write before
    (generations much quicker than the report: a synthetic run), the report is rewritten only when `due` (the
    run's history.png schedule: every `PLOT_EVERY_S`, and at the end). The first write is not judged: it pays
    for importing plotly and matplotlib. Route pictures are drawn once per genome.
    """

    def __init__(self, run_dir: str | Path, log: Callable[[str], Any], slow_s: float | None = None,
                 share: float | None = None):
        self.run_dir = Path(run_dir)
        self.log = log
        self.slow_s = SLOW_S if slow_s is None else slow_s
        self.share = SHARE if share is None else share
        self.seconds = 0.0  # how long the last write took
        self.writes = 0
        self.pictures: dict[str, str] = {}
        self._warned = ""
        self._written = time.perf_counter()

    def refresh(self, due: bool) -> Path | None:
        """Rewrite the report unless it is slow and not `due`; returns the file written, or None."""
        t0 = time.perf_counter()
        slow = self.seconds > min(self.slow_s, self.share * (t0 - self._written))
        if self.writes > 1 and slow and not due:
            return None
        try:
            path: Path | None = write_report(self.run_dir, pictures=self.pictures)
        except Exception as err:  # noqa: BLE001 - a report must never stop the run it reports on
            path, reason = None, one_line(err)
            if reason != self._warned:
                self.log(f"warning: {REPORT_NAME} not written: {reason}")
                self._warned = reason
        self._written = time.perf_counter()
        self.seconds = self._written - t0
        self.writes += 1
        return path
