"""report.md and a self-contained report.html over a run directory: a summary table, then per case its verdict,
figures, tables, provenance and the commands that reproduce it. Draws each case's figures (parity.report.curves,
parity.report.heatmap) beside its records; writes nothing else into the run directory.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

from parity.core import records
from parity.core.rundir import claim
from parity.report import markdown
from parity.report.curves import plot_case
from parity.report.heatmap import ProbesView, plot_probes
from parity.report.model import CaseRun, load_case_runs
from parity.report.tables import (BASELINE_COLUMNS, PAIR_COLUMNS, SETUP_COLUMNS, SUMMARY_COLUMNS, baseline_rows,
                                  ensemble_text, md_table, pair_rows, provenance, setup_rows, summary_row)

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:2em auto;max-width:1100px;color:#222;padding:0 1em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}th,td{border:1px solid #ccc;padding:.25em .6em;text-align:left}
th{background:#f3f3f3}code,pre{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.88em}
pre{background:#f6f8fa;padding:.6em;overflow-x:auto}img{max-width:100%;height:auto;border:1px solid #eee}
.pass{color:#1a7f37;font-weight:600}.fail{color:#cf222e;font-weight:600}section{border-top:1px solid #ddd;margin-top:2em}
"""


def _figure_or_none(run_dir, case: CaseRun) -> Path | None:
    if not any(s.steps for s in case.setups):
        return None
    return plot_case(run_dir, case.name, case)[0]


def _md_probes(case: CaseRun, view: ProbesView | None, run_dir) -> list[str]:
    """The heatmap, with a link to every row where it shows some; or the sentence that stands for it."""
    if view is None:
        return []
    if view.png is None:
        return [f"_Probes: {markdown.text(view.sentence)}._", ""]
    out = _md_figure(f"{case.name} probes", view.png, run_dir)
    if view.full_png is not None:
        out += [f"[Every probe row]({view.full_png.relative_to(Path(run_dir)).as_posix()})", ""]
    return out


def _html_probes(case: CaseRun, view: ProbesView | None, run_dir) -> list[str]:
    if view is None:
        return []
    if view.png is None:
        return [f"<p><em>Probes: {html.escape(view.sentence)}.</em></p>"]
    out = [_html_image(f"{case.name} probes heatmap", view.png)]
    if view.full_png is not None:
        # A link, not embedded: the whole matrix is several screens tall; it opens beside the report.
        href = html.escape(view.full_png.relative_to(Path(run_dir)).as_posix())
        out.append(f'<p><a href="{href}">Every probe row</a></p>')
    return out


def _md_figure(alt: str, png: Path, run_dir) -> list[str]:
    rel = png.relative_to(Path(run_dir)).as_posix()
    return [f"![{alt}]({rel})", "", f"[SVG]({Path(rel).with_suffix('.svg').as_posix()})", ""]


def _md_case(case: CaseRun, run_dir, png: Path | None, probes: ProbesView | None = None) -> list[str]:
    out = [f"## {case.name}", "",
           f"**{markdown.text(case.words())}** · setups: {', '.join(s.name for s in case.setups)}", ""]
    if case.verdict is not None and case.verdict.problems:
        out += ["Problems:", ""] + [f"- {markdown.text(p)}" for p in case.verdict.problems] + [""]
    out += _md_figure(case.name, png, run_dir) if png else ["_No metrics recorded: no figure._", ""]
    out += _md_probes(case, probes, run_dir)
    if pair_rows(case):
        out += [md_table(PAIR_COLUMNS, pair_rows(case)), ""]
    if ensemble := ensemble_text(case):
        out += ["Ensemble:", ""] + [f"- {markdown.text(line)}" for line in ensemble] + [""]
    if baseline_rows(case):
        out += ["Baselines:", "", md_table(BASELINE_COLUMNS, baseline_rows(case)), ""]
    prov = provenance(case, run_dir)
    out += ["Provenance:", ""]
    out += [f"- {k}: {markdown.code(v)}" for k, v in prov.items() if k != "command"]
    out += ["", md_table(SETUP_COLUMNS, setup_rows(case)), "", "Reproduce:", "", *markdown.fence(prov["command"], "sh"), ""]
    return out


def _html_table(columns, rows) -> str:
    head = "".join(f"<th>{html.escape(column)}</th>" for column in columns)
    cls = {"PASS": ' class="pass"', "FAIL": ' class="fail"'}
    body = "".join("<tr>" + "".join(f"<td{cls.get(r[column], '') if column == 'verdict' else ''}>"
                                    f"{html.escape(str(r[column]))}</td>" for column in columns) + "</tr>"
                   for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _html_image(alt: str, png: Path) -> str:
    # Embedded, not linked: the file must open from disk, from an artifact, anywhere.
    data = base64.b64encode(png.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _html_case(case: CaseRun, run_dir, png: Path | None, probes: ProbesView | None = None) -> str:
    e = html.escape
    cls = {True: "pass", False: "fail"}.get(case.passed, "")
    parts = [f'<section id="case-{e(case.name)}"><h2>{e(case.name)}</h2>',
             f'<p><strong class="{cls}">{e(case.words())}</strong> · setups: '
             f'{e(", ".join(s.name for s in case.setups))}</p>']
    if case.verdict is not None and case.verdict.problems:
        parts.append("<ul>" + "".join(f"<li>{e(p)}</li>" for p in case.verdict.problems) + "</ul>")
    parts.append(_html_image(f"{case.name} figure", png) if png else "<p><em>No metrics recorded: no figure.</em></p>")
    parts += _html_probes(case, probes, run_dir)
    if pair_rows(case):
        parts.append(_html_table(PAIR_COLUMNS, pair_rows(case)))
    if ensemble := ensemble_text(case):
        parts.append("<h3>Ensemble</h3><ul>" + "".join(f"<li>{e(line)}</li>" for line in ensemble) + "</ul>")
    if baseline_rows(case):
        parts.append("<h3>Baselines</h3>" + _html_table(BASELINE_COLUMNS, baseline_rows(case)))
    prov = provenance(case, run_dir)
    parts.append("<h3>Provenance</h3><ul>" + "".join(
        f"<li>{e(k)}: <code>{e(str(v))}</code></li>" for k, v in prov.items() if k != "command") + "</ul>")
    parts.append(_html_table(SETUP_COLUMNS, setup_rows(case)))
    parts.append("<h3>Reproduce</h3><pre>" + e("\n".join(prov["command"])) + "</pre></section>")
    return "\n".join(parts)


def _headline(cases: list[CaseRun]) -> str:
    n_pass = sum(1 for case in cases if case.passed)
    n_none = sum(1 for case in cases if case.verdict is None)
    headline = f"{len(cases)} cases · {n_pass} passed · {len(cases) - n_pass - n_none} failed"
    return headline + (f" · {n_none} without verdict" if n_none else "")


def write_report(run_dir) -> tuple[Path, Path]:
    """Draws every case's figure and writes `<run_dir>/report.md` and a self-contained `report.html`."""
    run_dir = Path(run_dir)
    cases = load_case_runs(run_dir)
    pngs = {case.name: _figure_or_none(run_dir, case) for case in cases}
    probes = {case.name: plot_probes(run_dir, case.name, case) for case in cases}
    rows = [summary_row(case) for case in cases]
    headline = _headline(cases)

    md = ["# Parity report", "", f"Run directory: {markdown.code(run_dir)} · {headline}", "", md_table(SUMMARY_COLUMNS, rows), ""]
    for case in cases:
        md += _md_case(case, run_dir, pngs[case.name], probes[case.name])
    md_path = claim(run_dir, "report.md")
    records.atomic_write_text(md_path, "\n".join(md))

    e = html.escape
    body = [f"<h1>Parity report</h1><p>Run directory: <code>{e(str(run_dir))}</code> · {e(headline)}</p>",
            _html_table(SUMMARY_COLUMNS, rows)]
    body += [_html_case(case, run_dir, pngs[case.name], probes[case.name]) for case in cases]
    page = (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>Parity report</title>'
            f"<style>{CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
    html_path = claim(run_dir, "report.html")
    records.atomic_write_text(html_path, page)
    return md_path, html_path
