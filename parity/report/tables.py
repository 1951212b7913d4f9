"""The report's tables and facts of a case, as rows of text: the summary, the pairs, the ensemble, the baselines,
the setups and the provenance; and a Markdown table of such rows. Shared by report.md, report.html and the PR
evidence block.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from parity.core.provenance import project_root
from parity.core.reproduce import root_relative, shareable
from parity.report import markdown
from parity.report.model import LABEL, CaseRun, number
from parity.verdict import localize
from parity.verdict.formatting import ensemble_lines, headline_text, ran_on, statistical_tests
from parity.verdict.model import BaselineCheck, MetricResult, Pair
from parity.verdict.numbers import bitwise_equal

SUMMARY_COLUMNS = ("case", "setups", "mode", "verdict", "ran on", "max rel diff loss", "max rel diff grad norm",
                   "headline")
PAIR_COLUMNS = ("pair", "passed", "loss max abs", "loss max rel", "grad norm max abs", "grad norm max rel",
                "exact steps", "probes", "problems")
BASELINE_COLUMNS = ("setup", "platform", "status", "triage", "message")
SETUP_COLUMNS = ("setup", "status", "world size", "mesh", "peak memory", "trained as", "started", "ended")
# run.json "peak_memory": {"measure": one of these, "per_rank_bytes": [int, ...], "max_bytes": int}
MEMORY_MEASURES = {"host_rss": "host RSS", "cuda_max_allocated": "CUDA max allocated"}


def number_text(value) -> str:
    """A number from a verdict in a table cell: '1.234e-05', '0', 'nan', or '—' when there is none."""
    v = number(value)
    if v is None:
        return "—"
    return "0" if v == 0 else f"{v:.3e}"


def md_table(columns, rows) -> str:
    # GitHub renders the emoji; the HTML report colours the word instead, since a machine
    # without an emoji font (headless CI) shows an empty box.
    rows = [{**r, "verdict": {"PASS": "✅ PASS", "FAIL": "❌ FAIL"}.get(r["verdict"], r["verdict"])} if "verdict" in r else r
            for r in rows]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(markdown.cell(r[column]) for column in columns) + " |" for r in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- summary


def _divergence_text(case: CaseRun) -> str:
    """Per pair, its headline: the first divergence in causal order (parity.verdict.headline)."""
    return "; ".join(f"{p.other}: {told}" for p in case.pairs if (told := headline_text(p))) or "—"


def summary_row(case: CaseRun) -> dict:
    judged = case.verdict is not None
    return {
        "case": case.name,
        "setups": ", ".join(s.name for s in case.setups),
        "mode": case.mode if judged else "—",
        "verdict": ("PASS" if case.passed else "FAIL") if judged else "no verdict",
        "ran on": ran_on(case.verdict) if judged else "—",
        "max rel diff loss": number_text(case.max_rel("loss")),
        "max rel diff grad norm": number_text(case.max_rel("grad_norm")),
        "headline": _divergence_text(case),
    }


# ----------------------------------------------------------------------------- pairs, ensemble, baselines


def _pair_row(p: Pair) -> dict:
    loss, gn = p.metrics["loss"], p.metrics["grad_norm"]
    return {
        "pair": f"{p.other} vs {p.reference}",
        "passed": "yes" if p.passed else "no",
        "loss max abs": number_text(loss.max_abs), "loss max rel": number_text(loss.max_rel),
        "grad norm max abs": number_text(gn.max_abs), "grad norm max rel": number_text(gn.max_rel),
        "exact steps": f"{_exact_steps(loss)} loss, {_exact_steps(gn)} grad norm",
        "probes": _probes_text(p),
        "problems": "; ".join(p.problems) or "—",
    }


def _exact_steps(m: MetricResult) -> str:
    return f"{m.exact_equal_steps}/{m.n}"


def pair_rows(case: CaseRun) -> list[dict]:
    return [_pair_row(p) for p in case.pairs]


def _entry_text(e: dict) -> str:
    exact = bitwise_equal(number(e["value_ref"]), number(e["value_other"]))
    return f"{e['phase']} {e['name']} " + ("exact" if exact else f"rel {localize.rel_text(number(e['rel']))}")


def _probes_text(p: Pair) -> str:
    """Where the pair's probes first part, with the entries just before it and any probe problems."""
    loc = p.localization
    if not loc:
        return "—"  # a verdict written before probes
    text = loc.line
    if loc.before:
        text += " (before it: " + ", ".join(_entry_text(e) for e in loc.before) + ")"
    return "; ".join([text] + [f"problem: {q}" for q in loc.problems])


def ensemble_text(case: CaseRun) -> list[str]:
    """Statistical mode: the ensemble and the test, then each setup's largest |z| and windows outside the band."""
    if case.verdict is None or not case.verdict.statistical:
        return []
    lines = [line.strip() for line in ensemble_lines(case.verdict.statistical)]
    for name, tests in list(statistical_tests(case.verdict).items())[1:]:  # the reference's own is in ensemble_lines
        lines.append(f"{name}: " + "; ".join(
            f"{LABEL[m]} max |z| {number_text(t.max_abs_z)}, {t.failing_windows} of {len(t.z)} windows outside"
            for m, t in tests.items() if t) if any(tests.values()) else f"{name}: not tested")
    return lines


def baseline_rows(case: CaseRun) -> list[dict]:
    return [{"setup": b.setup, "platform": b.platform, "status": b.status, "triage": triage_text(b),
             "message": b.message or "—"} for b in case.baseline_checks]


def triage_text(b: BaselineCheck) -> str:
    """Why a baseline comparison failed, and what can localise it: "—" where it did not fail (or the verdict is
    older than triage)."""
    t = b.triage
    return (f"{t.line}; {t.where}" if t.where else t.line) if t else "—"


# ----------------------------------------------------------------------------- setups and provenance


def _mesh(run: dict) -> str:
    shape, names = run.get("mesh_shape"), run.get("mesh_dim_names")
    if not shape:
        return "—"
    if names and len(names) == len(shape):
        return " × ".join(f"{n}={s}" for n, s in zip(names, shape))
    return " × ".join(map(str, shape))


def peak_memory(run: dict) -> str:
    """The largest peak over the setup's ranks, e.g. "412 MiB (host RSS)"; "—" where run.json has none
    (older runs, setups run by another trainer or command)."""
    peak = run.get("peak_memory")
    if not isinstance(peak, dict):
        return "—"
    per_rank = [b for b in peak.get("per_rank_bytes") or [] if isinstance(b, int) and not isinstance(b, bool)]
    largest = max(per_rank, default=peak.get("max_bytes"))
    if not isinstance(largest, int) or isinstance(largest, bool):
        return "—"
    measure = peak.get("measure")
    return f"{largest / 2**20:.0f} MiB ({MEMORY_MEASURES.get(measure, str(measure))})"


def setup_rows(case: CaseRun) -> list[dict]:
    # "trained as": the suite planner trained this setup once, for another case that names it too.
    return [{"setup": s.name, "status": s.run.get("status", "—"), "world size": s.run.get("world_size", "—"),
             "mesh": _mesh(s.run), "peak memory": peak_memory(s.run), "trained as": s.run.get("trained_as", "—"),
             "started": s.run.get("started", "—"), "ended": s.run.get("ended", "—")}
            for s in case.setups]


def _same_or_each(case: CaseRun, key: str) -> str:
    return _joined(s.run.get(key) for s in case.setups)


def _joined(values) -> str:
    uniq = list(dict.fromkeys(str(v) for v in values if v not in (None, "")))
    return " / ".join(uniq) if uniq else "—"


def _parity(run: dict) -> str | None:
    """The parity that ran a setup: its version, and its own commit where it ran from a checkout of parity."""
    version, commit = run.get("parity_version"), run.get("parity_commit")
    return f"{version or 'unknown'} (checkout {commit})" if commit else version


def commands(case: CaseRun, run_dir) -> list[str]:
    """The commands that reproduce the case, from run.json (the CLI invocation when none is recorded), as they
    run from the repository root: paths relative to it, no --out outside it (parity.core.reproduce.shareable)."""
    root = project_root(Path.cwd())
    cmds = [shlex.join(shareable([str(a) for a in s.run["command"]], root)) for s in case.setups
            if s.run.get("command")]
    if cmds:
        return list(dict.fromkeys(cmds))
    case_path = next((s.run.get("case_path") for s in case.setups if s.run.get("case_path")), f"cases/{case.name}.toml")
    return [shlex.join(shareable(["parity", "run", str(case_path), "--out", root_relative(run_dir, root)], root))]


def provenance(case: CaseRun, run_dir) -> dict:
    """Shared facts about the case's runs (values that differ between setups are joined by ' / '); the
    torchtitan a setup ran, where one did."""
    titan = {k: _same_or_each(case, key) for k, key in (("torchtitan", "torchtitan"),
                                                          ("torchtitan commit", "torchtitan_commit"))
             if any(s.run.get(key) for s in case.setups)}
    return {
        "torch": _same_or_each(case, "torch"),
        "device": _same_or_each(case, "device"),
        "platform": case.platform,
        "backend": _same_or_each(case, "backend"),
        "python": _same_or_each(case, "python"),
        "seed checkpoint sha256": _same_or_each(case, "seed_checkpoint_sha256"),
        "case sha256": _same_or_each(case, "case_sha256"),
        "commit under test": _same_or_each(case, "git_commit"),
        **titan,
        "parity": _joined(_parity(s.run) for s in case.setups),
        "command": commands(case, run_dir),
    }
