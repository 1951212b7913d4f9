"""The suite planner: which setups share a training and a launch (in milliseconds), then real launches:
a suite plan gives the same bits as planning each case alone, and a crash fails only its own setup."""

import json
from pathlib import Path

import pytest

from parity.core import records
from parity.run.plan import Job, plan, shares, summary, training_key
from parity.run.runner import RunOptions, repeat_setup, run_suite
from parity.case.loader import load_case

TINY = """
description = "{what}"
[train]
model = "tiny"
steps = 3
global_batch = 4
seq_len = 16
"""


def tiny_case(write_case, name: str, setups: str, what: str = "planner test", extra: str = ""):
    return load_case(write_case(TINY.format(what=what) + extra + setups, name))


FSDP2 = '{name}\ndp_api = "fully_shard"\ndp_shard = 2\n'
REPLICATE2 = '{name}\ndp_api = "replicate"\ndp_replicate = 2\n'
SINGLE = '{name}\ndp_api = "none"\n'


def setups(*pairs) -> str:
    return "".join(body.format(name=f"[setups.{name}]") for name, body in pairs)


def jobs_of(*cases, seed="a" * 64):
    return [Job(c, s, "cpu", "/seed", seed, tuple(c.probes.steps_for(s.train.steps))) for c in cases for s in c.setups]


@pytest.fixture
def three(write_case):
    """Two cases naming one FSDP-2 setup under different names; a third with a world-size-1 setup."""
    a = tiny_case(write_case, "a", setups(("fsdp", FSDP2), ("replicate", REPLICATE2)))
    b = tiny_case(write_case, "b", setups(("fsdp_2", FSDP2), ("single", SINGLE)))
    c = tiny_case(write_case, "c", setups(("single", SINGLE), ("replicate_2", REPLICATE2)), extra="[probes]\nsteps = [1]\n")
    return a, b, c


# ---- planning alone ---------------------------------------------------------------------------


def test_identical_setups_train_once_and_each_world_size_is_one_launch(three):
    a, b, c = three
    launches = plan(jobs_of(a, b, c))
    assert [(x.world_size, x.trainer) for x in launches] == [(1, "builtin"), (2, "builtin")]
    trained = {t.first.label: [j.label for j in t.shared_with] for x in launches for t in x.trainings}
    # c probes only step 1: its setups compute the same numbers but record other probes, so they train apart.
    assert trained == {"b/single": [], "c/single": [], "a/fsdp": ["b/fsdp_2"], "a/replicate": [],
                       "c/replicate_2": []}
    text = summary(launches)
    assert text.splitlines()[0] == "plan (suite): 6 setups, 5 trained (1 reused), 2 launches"
    assert text.count("a/fsdp") == 1 and "a/fsdp (also b/fsdp_2)" in text


def test_anything_that_changes_the_numbers_keeps_trainings_apart(three):
    a, b, _ = three
    base = jobs_of(a)[0]
    assert training_key(base) == training_key(jobs_of(b)[0])  # b's fsdp_2: the same setup under another name
    from dataclasses import replace

    assert training_key(base) != training_key(replace(base, seed_sha256="b" * 64))
    assert training_key(base) != training_key(replace(base, device="cuda"))
    assert training_key(base) != training_key(replace(base, probe_steps=(1,)))
    steps = replace(base.setup, train=replace(base.setup.train, steps=4))
    assert training_key(base) != training_key(replace(base, setup=steps))
    relaxed = replace(base.case, determinism={**base.case.determinism, "deterministic_algorithms": False})
    assert training_key(base) != training_key(replace(base, case=relaxed))
    # Other determinism settings: another process, so another launch.
    launches = plan([base, replace(jobs_of(a)[1], case=relaxed)])
    assert len(launches) == 2


def test_case_and_setup_plans(three):
    a, b, c = three
    by_case = plan(jobs_of(a, b, c), "case")
    assert [(x.world_size, [t.first.label for t in x.trainings]) for x in by_case] == [
        (2, ["a/fsdp", "a/replicate"]), (1, ["b/single"]), (2, ["b/fsdp_2"]), (1, ["c/single"]), (2, ["c/replicate_2"])]
    naive = plan(jobs_of(a, b, c), "setup")
    assert len(naive) == 6 and all(len(x.trainings) == 1 and not x.trainings[0].shared_with for x in naive)
    with pytest.raises(ValueError, match="allowed: suite, case, setup"):
        plan(jobs_of(a), "cases")


def test_a_repeat_runs_last_in_its_launch(three):
    a, b, _ = three
    again = repeat_setup(a)
    jobs = jobs_of(a, b)
    jobs.insert(0, Job(a, again, "cpu", "/seed", "a" * 64, jobs[0].probe_steps))
    ws2 = plan(jobs)[1]
    assert ws2.trainings[-1].first.setup.name == "fsdp.repeat"
    assert len(ws2.trainings) == 3  # the repeat is a run of its own, never shared with the first one


def test_lanes_use_the_cores_a_launch_leaves_idle(three, write_case):
    a, b, c = three
    d = tiny_case(write_case, "d", setups(("single", SINGLE + "lr = 0.002\n"), ("other", SINGLE + "lr = 0.003\n")))
    one = plan(jobs_of(a, b, c, d))
    assert [(x.world_size, x.lanes) for x in one] == [(1, 1), (2, 1)]  # one core: the plan as before
    two = plan(jobs_of(a, b, c, d), cores=2)
    # world size 1 on 2 cores: two lanes, the four trainings dealt two each, in planned order within a lane;
    # world size 2 fills both cores already
    assert [(x.world_size, x.lane, x.lanes) for x in two] == [(1, 0, 2), (1, 1, 2), (2, 0, 1)]
    assert [[t.first.label for t in x.trainings] for x in two[:2]] == [["b/single", "d/single"], ["c/single", "d/other"]]
    assert sorted(t.first.label for x in two for t in x.trainings) == sorted(t.first.label for x in one for t in x.trainings)
    assert "launch 2: torchrun, world size 1, cpu, lane 2 of 2 (at once): c/single; d/other" in summary(two)
    assert [x.lanes for x in plan(jobs_of(a, b, c, d), cores=4)][:4] == [4, 4, 4, 4]
    gpu = [Job(j.case, j.setup, "cuda", j.seed_checkpoint, j.seed_sha256, j.probe_steps) for j in jobs_of(b, c, d)]
    assert all(x.lanes == 1 for x in plan(gpu, cores=2))  # GPUs are allocated per launch, not shared out here
    again = Job(c, repeat_setup(c), "cpu", "/seed", "a" * 64, ())  # c.single run twice: keep it whole
    assert all(x.lanes == 1 for x in plan([*jobs_of(b, c, d), again], cores=2) if x.world_size == 1)


def test_shares_keep_cases_that_share_a_training_together(three, write_case):
    a, b, c = three
    hsdp = '{name}\ndp_api = "fully_shard"\ndp_replicate = 2\n'
    d = tiny_case(write_case, "d", setups(("hsdp", hsdp), ("fsdp_4", '{name}\ndp_api = "fully_shard"\ndp_shard = 4\n')))
    got = shares([a, b, c, d], 2)
    assert got["a"] == got["b"]  # they share fsdp
    assert set(got.values()) == {0, 1}  # both workers get work
    assert shares([a, b, c, d], 1) == dict.fromkeys("abcd", 0)


# ---- real launches ----------------------------------------------------------------------------


def record_bytes(out: Path, case: str, setup: str) -> dict[str, object]:
    """Every record a comparison reads, with the step times (the one thing two runs never share) left out."""
    d = out / case / setup
    got = {}
    for name in records.RECORD_FILES:
        if (d / name).is_file():
            got[name] = (d / name).read_bytes()
    metrics = [{k: v for k, v in r.items() if k != "step_time_s"} for r in records.read_metrics(d / "metrics.csv")]
    got["metrics.csv"] = json.dumps(metrics)  # values, bit for bit: read back with float(repr)
    return got


@pytest.mark.slow
def test_suite_plan_is_bit_identical_to_each_case_alone(three, tmp_path, seed_cache):
    """The suite plan (shared trainings, one launch per world size, its world-size-1 launch split into two
    lanes that run at once) against each case planned alone (no sharing, no lanes)."""
    cases = list(three)
    devices = dict.fromkeys((c.name for c in cases), "cpu")
    suite = run_suite(cases, tmp_path / "suite", devices, RunOptions(cache=seed_cache, timeout_s=300, cores=2))
    alone = run_suite(cases, tmp_path / "alone", devices, RunOptions(cache=seed_cache, timeout_s=300, plan="case"))
    for c in cases:
        for s in c.setups:
            assert suite[c.name][s.name].status == "ok" and alone[c.name][s.name].status == "ok"
            assert record_bytes(tmp_path / "suite", c.name, s.name) == record_bytes(tmp_path / "alone", c.name, s.name), \
                f"{c.name}/{s.name}"
    log = records.read_json(tmp_path / "suite" / "plan.json")
    assert [(x["world_size"], x["lane"], x["lanes"]) for x in log["launches"]] == [(1, 0, 2), (1, 1, 2), (2, 0, 1)]
    first, second = log["launches"][:2]
    assert first["ended"] - first["wall_s"] < second["ended"] and second["ended"] - second["wall_s"] < first["ended"]
    assert sum(json.dumps(log["launches"]).count(f'"{label}"') for label in ("a/fsdp", "b/fsdp_2")) == 2
    shared = records.read_json(tmp_path / "suite" / "b" / "fsdp_2" / "run.json")
    assert shared["trained_as"] == "a/fsdp" and shared["case"] == "b" and shared["setup"] == "fsdp_2"
    assert shared["case_path"].endswith("b.toml")
    assert not list((tmp_path / "suite" / "b" / "fsdp_2").glob("rank*.log"))  # the logs stay where it trained
    assert records.read_json(tmp_path / "suite" / "b" / "launches.json")["launches"][1]["setups"] == {"fsdp_2": "a/fsdp"}
    assert len(records.read_json(tmp_path / "alone" / "plan.json")["launches"]) == 5
    timings = records.read_json(tmp_path / "suite" / "a" / "fsdp" / "run.json")["timings"]
    assert set(timings) >= {"torchrun_start_s", "rank_imports_s", "process_group_s", "parallelize_s", "build_s",
                            "seed_load_s", "steps_s", "digest_s"} and all(v >= 0 for v in timings.values())


@pytest.mark.slow
def test_a_crash_fails_only_the_cases_that_use_that_setup(write_case, tmp_path, seed_cache):
    broken = tiny_case(write_case, "broken", setups(("fsdp", FSDP2), ("crash", FSDP2 + 'fault = "crash"\n')))
    healthy = tiny_case(write_case, "healthy", setups(("replicate", REPLICATE2), ("fsdp_2", FSDP2)))
    devices = {"broken": "cpu", "healthy": "cpu"}
    results = run_suite([broken, healthy], tmp_path / "out", devices, RunOptions(cache=seed_cache, timeout_s=300))
    assert results["broken"]["crash"].status == "failed"
    assert "setup broken/crash rank 1: RuntimeError: planted fault" in results["broken"]["crash"].message
    assert results["broken"]["fsdp"].status == "ok"
    assert {r.status for r in results["healthy"].values()} == {"ok"}, results["healthy"]
    log = records.read_json(tmp_path / "out" / "plan.json")["launches"]
    # The crash took its launch down before `healthy/replicate` ran: that one went on in a launch of its own.
    assert [(x["name"], x["status"]) for x in log] == [("launch1", "failed"), ("launch1-retry1", "ok")]
    assert [t["trained_as"] for t in log[1]["trainings"]] == ["healthy/replicate"]
    assert records.read_json(tmp_path / "out" / "healthy" / "fsdp_2" / "run.json")["trained_as"] == "broken/fsdp"
    assert (tmp_path / "out" / "broken" / "torchrun-launch1.log").is_file()
