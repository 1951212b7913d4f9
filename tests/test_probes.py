"""Logical probes: one training in several layouts records the same logical numbers; planted faults
that say where show up exactly there; probes never change what else a run records.

Names and case validation in milliseconds; then real trainings (tiny model, gloo, 1, 2 and 4 ranks,
3 steps, steps 1 and 2 probed), in the session's shared launches (tests/trained_together.py): every
layout with probes, and three 2-rank layouts again without them.
"""

import math

import pytest
import torch

from parity.core import records
from parity.rank.model import build_model
from parity.core.presets import PRESETS, param_names, probe_modules
from parity.case.loader import load_case
from parity.case.schema import Probes, SpecError
from trained_together import PROBES, TRAIN

CFG = PRESETS["tiny"]


# ---- names --------------------------------------------------------------------------------

def test_preset_names_are_the_models():
    model = build_model(CFG, 16, seed=1)
    assert param_names(CFG) == [n for n, _ in model.named_parameters()]
    order = []
    modules = dict(model.named_modules())
    for name in probe_modules(CFG):
        modules[name].register_forward_hook(lambda m, a, o, name=name: order.append(name))
    model(torch.zeros(2, 16, dtype=torch.long))
    assert order == probe_modules(CFG)  # forward execution order, each module once


# ---- which steps ----------------------------------------------------------------------------

def test_default_probe_steps():
    assert Probes().steps_for(64) == list(range(1, 65))
    steps = Probes().steps_for(1000)  # every 16th (ceil(1000 / 64)), steps 1..8, and the last
    assert steps[:9] == [1, 2, 3, 4, 5, 6, 7, 8, 16] and steps[-3:] == [976, 992, 1000] and len(steps) == 71
    assert Probes(steps="all").steps_for(100) == list(range(1, 101))
    assert Probes(steps=(2, 9)).steps_for(5) == [2]  # a --steps override drops the later ones
    assert Probes(enabled=False, steps="all").steps_for(10) == []


def test_probes_table_is_read(write_case):
    case = load_case(write_case(BASE + "[probes]\nsteps = [3, 1]\n" + SETUPS))
    assert case.probes == Probes(True, (1, 3))
    assert load_case(write_case(BASE + SETUPS)).probes == Probes()


BASE = """
description = "probe validation"
[train]
model = "tiny"
steps = 3
"""
SETUPS = """
[setups.a]
dp_api = "none"
[setups.b]
dp_api = "none"
"""


@pytest.mark.parametrize("fault,message", [
    ('{ kind = "scale_output", module = "layers.9.feed_forward", factor = 1.001 }',
     "setups.b.fault.module: 'layers.9.feed_forward' is not a module of the model; allowed: tok_embeddings,"),
    ('{ kind = "scale_grad", param = "layers.2.attention.wq", factor = 1.001 }',
     "setups.b.fault.param: 'layers.2.attention.wq' is not a param of the model; allowed: tok_embeddings.weight,"),
    ('{ kind = "scale_grad", param = "norm.weight", factor = 0 }', "setups.b.fault.factor: 0 is not allowed"),
    ('{ kind = "scale_grad", param = "norm.weight", factor = nan }', "setups.b.fault.factor: nan is not allowed"),
    ('{ kind = "scale_grad", param = "norm.weight" }', "setups.b.fault.factor: required"),
    ('{ kind = "scale_up", param = "norm.weight", factor = 2 }', "setups.b.fault.kind: 'scale_up' is not allowed; allowed: scale_output, scale_grad"),
    ('{ kind = "scale_grad", module = "norm", factor = 2 }', "setups.b.fault.module: unknown key; allowed: factor, kind, param"),
    ('"scale_output"', "setups.b.fault: 'scale_output' says where and how much; allowed: a table"),
])
def test_bad_fault_tables_are_rejected(write_case, fault, message):
    path = write_case(BASE + SETUPS + f"fault = {fault}\n")
    with pytest.raises(SpecError) as e:
        load_case(path)
    assert str(e.value).startswith(f"{path}: {message}") and "\n" not in str(e.value)


@pytest.mark.parametrize("table,message", [
    ("steps = []", "probes.steps: [] is not allowed"),
    ("steps = [4]", "probes.steps[0]: 4 is not allowed; allowed: an integer from 1 to 3"),
    ("steps = [2, 2]", "probes.steps: [2, 2] names a step twice"),
    ('steps = "some"', "probes.steps: 'some' is not allowed"),
    ("enabled = 1", "probes.enabled: 1 is not allowed; allowed: true, false"),
    ("every = 2", "probes.every: unknown key; allowed: enabled, steps"),
])
def test_bad_probes_tables_are_rejected(write_case, table, message):
    path = write_case(BASE + f"[probes]\n{table}\n" + SETUPS)
    with pytest.raises(SpecError, match="^" + str(path) + ": " + message.replace("[", r"\[").replace("]", r"\]")):
        load_case(path)


def test_fault_tables_fill_the_setup(write_case):
    case = load_case(write_case(BASE + SETUPS + 'fault = { kind = "scale_grad", param = "norm.weight", factor = 2 }\n'))
    b = case.setup("b")
    assert (b.fault, b.fault_at, b.fault_factor) == ("scale_grad", "norm.weight", 2.0)
    assert case.setup("a").fault is None


def test_scale_grad_star_names_every_parameter(write_case):
    """param = "*": every gradient scaled (a loss-normalisation error), checked here without a launch."""
    from types import SimpleNamespace

    import torch

    from parity.rank.faults import scale_grad

    case = load_case(write_case(BASE + SETUPS + 'fault = { kind = "scale_grad", param = "*", factor = 512 }\n'))
    b = case.setup("b")
    assert (b.fault, b.fault_at, b.fault_factor) == ("scale_grad", "*", 512.0)
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    model(torch.ones(1, 2)).sum().backward()
    before = [p.grad.clone() for p in model.parameters()]
    scale_grad(SimpleNamespace(modules=[model]), b.fault_at, b.fault_factor)
    assert all(torch.equal(p.grad, g * 512) for p, g in zip(model.parameters(), before))


# ---- real launches ------------------------------------------------------------------------

FACTOR = 1.5
OUTPUT_AT, GRAD_AT = "layers.1.feed_forward", "layers.2.attention.wq.weight"  # layers.2 is on pipeline stage 1
LAYOUTS = {
    "single": 'dp_api = "none"',
    "single_mb": 'dp_api = "none"\nmicrobatches = 2',
    "replicate": 'dp_api = "replicate"\ndp_replicate = 2',
    "hsdp": 'dp_api = "fully_shard"\ndp_replicate = 2\ndp_shard = 1',
    "fsdp": 'dp_api = "fully_shard"\ndp_shard = 2',
    "ddp": 'dp_api = "ddp"\ndp_replicate = 2',
    "tp": 'dp_api = "fully_shard"\ntp = 2',
    "pp": 'dp_api = "fully_shard"\npp = 2\nmicrobatches = 2',
    "tp_plain": 'dp_api = "none"\ntp = 2',
    "pp_plain": 'dp_api = "none"\npp = 2\nmicrobatches = 2',
    "pp_interleaved": 'dp_api = "fully_shard"\npp = 2\npp_schedule = "interleaved_1f1b"\nmicrobatches = 2',
    "fsdp_tp": 'dp_api = "fully_shard"\ndp_shard = 2\ntp = 2',
    "hsdp_2x2": 'dp_api = "fully_shard"\ndp_replicate = 2\ndp_shard = 2',
    "replicate_pp": 'dp_api = "replicate"\ndp_replicate = 2\npp = 2\nmicrobatches = 2',
    "tp_scale_output": f'dp_api = "fully_shard"\ntp = 2\nfault = {{ kind = "scale_output", module = "{OUTPUT_AT}", factor = {FACTOR} }}',
    "tp_scale_logits": f'dp_api = "fully_shard"\ntp = 2\nfault = {{ kind = "scale_output", module = "output", factor = {FACTOR} }}',
    "pp_scale_grad": (f'dp_api = "fully_shard"\npp = 2\nmicrobatches = 2\n'
                      f'fault = {{ kind = "scale_grad", param = "{GRAD_AT}", factor = {FACTOR} }}'),
}
ON_OFF = ("fsdp", "tp", "pp")  # trained again with probes off


def setups(names) -> str:
    return "".join(f"[setups.{n}]\n{LAYOUTS[n]}\n" for n in names)


TRAINED_TOGETHER = {
    "probes": '\ndescription = "one training in several layouts, and two planted faults"\n' + TRAIN + PROBES + setups(LAYOUTS),
    "probes_off": ('\ndescription = "three of them again, probes off"\n' + TRAIN + "[probes]\nenabled = false\n"
                   + setups(ON_OFF)),
}


@pytest.fixture(scope="module")
def runs(trained_together):
    for name in TRAINED_TOGETHER:
        for setup, r in trained_together[name].results.items():
            assert r.status == "ok", (name, setup, r.message)
    return trained_together


def probes(runs, name):
    return records.read_probes(runs["probes"].dir(name) / "probes.csv")


def max_rel(a, b) -> dict[str, float]:
    """Largest relative difference per phase between two probes.csv row lists of the same rows."""
    assert [(r["step"], r["phase"], r["name"]) for r in a] == [(r["step"], r["phase"], r["name"]) for r in b]
    worst = {}
    for x, y in zip(a, b):
        rel = abs(x["value"] - y["value"]) / abs(x["value"]) if x["value"] else abs(y["value"])
        worst[x["phase"]] = max(worst.get(x["phase"], 0.0), rel)
    return worst


@pytest.mark.slow
def test_rows_in_causal_order(runs):
    rows = probes(runs, "single")
    params = param_names(CFG)
    one_step = ([("forward", m) for m in probe_modules(CFG)] + [("backward", p) for p in reversed(params)]
                + [("update", p) for p in params])
    assert [(r["phase"], r["name"]) for r in rows] == one_step * 2  # steps 1 and 2 of 3
    assert [r["step"] for r in rows] == [1] * len(one_step) + [2] * len(one_step)
    assert all(r["stat"] == "sumsq" and r["value"] > 0 and math.isfinite(r["value"]) for r in rows)


# Layouts that compute the same numbers in another order agree to float32 rounding. Measured
# against single (max rel over both steps): forward <= 2.7e-7 (tp), backward <= 9.8e-7 (fsdp_tp),
# update <= 1.9e-6 (tp; Adam's m / sqrt(v) amplifies where a gradient is near eps); 1e-5 leaves headroom.
RTOL = 1e-5


# tp_plain: TP without a data-parallel wrapper leaves gradients whose placements differ from their
# parameters' (the embedding's Replicate, the RMSNorm weights' Partial).
@pytest.mark.slow
@pytest.mark.parametrize("name", ["single_mb", "replicate", "fsdp", "ddp", "tp", "tp_plain", "pp", "pp_plain",
                                  "pp_interleaved", "fsdp_tp", "hsdp_2x2", "replicate_pp"])
def test_layouts_agree(runs, name):
    worst = max_rel(probes(runs, "single"), probes(runs, name))
    print(f"\nprobes single vs {name}: max rel " + ", ".join(f"{k} {v:.2e}" for k, v in worst.items()))
    assert all(v <= RTOL for v in worst.values()), worst


@pytest.mark.slow
def test_replicate_and_hsdp_agree_bitwise(runs):
    # The same full parameters, the same rows per rank, the same AVG all-reduce: the same bits.
    assert probes(runs, "replicate") == probes(runs, "hsdp")


@pytest.mark.slow
@pytest.mark.parametrize("name,module", [("tp_scale_output", OUTPUT_AT), ("tp_scale_logits", "output")])
def test_scale_output_shows_from_that_module_on(runs, name, module):
    # A sequence shard on each tp rank, or (output) the same full tensor on both: every holder scales it.
    clean = [r for r in probes(runs, "tp") if r["step"] == 1 and r["phase"] == "forward"]
    bad = [r for r in probes(runs, name) if r["step"] == 1 and r["phase"] == "forward"]
    at = probe_modules(CFG).index(module)
    assert [r["value"] for r in bad[:at]] == [r["value"] for r in clean[:at]]  # bitwise before it
    assert all(b["value"] != c["value"] for b, c in zip(bad[at:], clean[at:]))  # and changed from it on
    # Every tp rank scaled its piece: the logical output's sum of squares moved by factor**2.
    assert bad[at]["value"] / clean[at]["value"] == pytest.approx(FACTOR**2, rel=1e-6)


@pytest.mark.slow
def test_scale_grad_shows_on_that_parameter_only(runs):
    clean = [r for r in probes(runs, "pp") if r["step"] == 1]
    bad = [r for r in probes(runs, "pp_scale_grad") if r["step"] == 1]
    changed = [(b["phase"], b["name"]) for b, c in zip(bad, clean) if b["phase"] != "update" and b["value"] != c["value"]]
    assert changed == [("backward", GRAD_AT)]
    at = next(i for i, r in enumerate(clean) if (r["phase"], r["name"]) == ("backward", GRAD_AT))
    assert bad[at]["value"] / clean[at]["value"] == pytest.approx(FACTOR**2, rel=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("name", ON_OFF)
def test_probes_change_nothing_else(runs, name):
    """metrics.csv (but its step times) and weights.csv bit-identical with probes on and off; step 3,
    never probed, included."""
    on, off = runs["probes"].dir(name), runs["probes_off"].dir(name)
    without_times = lambda path: [line.rsplit(",", 1)[0] for line in path.read_text().splitlines()]  # noqa: E731
    assert (on / "metrics.csv").read_text().splitlines()[0].endswith(",step_time_s")
    assert without_times(on / "metrics.csv") == without_times(off / "metrics.csv")
    assert (on / "weights.csv").read_bytes() == (off / "weights.csv").read_bytes()
    assert (on / "probes.csv").is_file() and not (off / "probes.csv").exists()
