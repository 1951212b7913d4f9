"""The case's cross-field rules: each a small function that returns (key, message) for what it finds wrong.

The loader applies each list where its fields are known: SETUP_RULES to every built-in setup (keys
relative to `setups.NAME.`), SETUPS_RULES to the case's setups, EXPECT_RULES to the parsed [expect]
and CASE_RULES to the whole case; the first problem found is the one line reported. The parallelism
rules themselves live in parity.core.parallel_dims, shared with the mesh builder.
"""

from __future__ import annotations

from parity.case.fields import Integer, Problem
from parity.case.schema import Expect, Probes, Setup, Train
from parity.case.trainer import BUILTIN
from parity.core.parallel_dims import MAX_WORLD_SIZE, problems
from parity.core.tokens import TokenFileError, load_token_file


def world_size_factors(s: Setup, body: dict) -> list[tuple[str, str]]:
    """A built-in setup's world_size, where given, is the product of its parallel degrees."""
    world = body.get("world_size")
    if world is None:
        return []
    try:
        Integer(1, MAX_WORLD_SIZE).check(world)
    except Problem as e:
        return [("world_size", str(e))]
    if world == s.world_size:
        return []
    return [("world_size", f"{world} does not factor as dp_replicate*dp_shard*tp*pp = "
             f"{s.dp_replicate}*{s.dp_shard}*{s.tp}*{s.pp} = {s.world_size}")]


def parallel_layout(s: Setup, body: dict):
    """parity.core.parallel_dims.problems, lazily (each assumes the ones before it passed); `body`: the keys given."""
    return problems(s, frozenset(body))


def noise_only_on_reference(setups: tuple[Setup, ...], train: Train) -> list[tuple[str, str]]:
    return [(f"setups.{s.name}.fault", "\"noise\" perturbs the reference's repeat run; allowed only on the "
             "reference (first) setup") for s in setups[1:] if s.fault == "noise"]


def token_file_fits(setups: tuple[Setup, ...], train: Train) -> list[tuple[str, str]]:
    """A token file is read and checked here, before any rank starts, against the setup's model.
    Setups cannot override data, model or seq_len: the reference's check covers them all."""
    if train.data is None:
        return []
    t = setups[0].train
    try:
        load_token_file(t.data, t.seq_len, t.model_config.vocab_size)
    except TokenFileError as e:
        return [("train.data", str(e))]
    return []


def statistical_reference_is_builtin(setups: tuple[Setup, ...]) -> list[tuple[str, str]]:
    ref = setups[0]
    if ref.trainer == BUILTIN:
        return []
    return [(f"setups.{ref.name}.trainer", "statistical mode runs the reference again as an ensemble, perturbing "
             "it from inside the built-in trainer; allowed: a built-in reference (the first setup)")]


def localized_setups_record_probes(setups: tuple[Setup, ...]) -> list[tuple[str, str]]:
    other = next((s for s in setups if s.trainer != BUILTIN), None)
    if other is None:
        return []
    return [("expect.localized", f"needs probes, which only built-in setups record; setup {other.name} is trainer = "
             f"\"{other.trainer}\"")]


def localized_not_statistical(expect: Expect) -> list[tuple[str, str]]:
    if not (expect.localized and expect.statistical):
        return []
    return [("expect.localized", "probes part at the first rounding difference, which statistical mode expects; "
             "allowed: first_divergence (the window the control leaves the band in)")]


def localized_step_is_probed(expect: Expect, probes: Probes, train: Train) -> list[tuple[str, str]]:
    if not expect.localized or expect.localized["step"] in probes.steps_for(train.steps):
        return []
    return [("expect.localized.step", f"{expect.localized['step']} is not a probed step, so no probe can part there; "
             "allowed: a step [probes] records (probes enabled, and the step in its steps)")]


SETUP_RULES = (world_size_factors, parallel_layout)
SETUPS_RULES = (noise_only_on_reference, token_file_fits)
EXPECT_RULES = (localized_not_statistical,)
CASE_RULES = (localized_step_is_probed,)
