"""Case files: parsing, defaults, and one clear error line per mistake."""

import pytest

from parity.case.loader import load_case
from parity.case.schema import DEFAULT_TOLERANCES, SpecError, Train
from parity.trainers import load_case as load_case_of_any_trainer

GOOD = """
description = "two setups"
[train]
model = "tiny"
[setups.a]
dp_api = "replicate"
dp_replicate = 8
[setups.b]
dp_api = "fully_shard"
dp_replicate = 8
dp_shard = 1
"""


def test_parses_a_good_case(write_case):
    case = load_case(write_case(GOOD, "my_case"))
    assert case.name == "my_case"
    assert [s.name for s in case.setups] == ["a", "b"]
    assert case.reference.name == "a" and case.world_size == 8
    assert case.expect.mode == "bitwise" and case.expect.outcome == "match"
    assert case.expect.tolerance["loss"].rtol == DEFAULT_TOLERANCES["float32"]["loss"][0]
    assert len(case.sha256) == 64


def test_setup_overrides_train_keys(write_case):
    case = load_case(write_case(GOOD.replace('dp_shard = 1', 'dp_shard = 1\nlr = 0.00101')))
    assert case.setup("b").train.lr == 0.00101 and case.setup("a").train.lr == Train().lr


def test_dp_shard_minus_one_fills_from_world_size(write_case):
    case = load_case(write_case(GOOD.replace("dp_shard = 1", "dp_shard = -1\nworld_size = 8")))
    assert case.setup("b").dp_shard == 1


def test_tolerance_from_case(write_case):
    case = load_case(write_case(GOOD + '[expect]\nmode = "tolerance"\n[expect.tolerance]\nloss = { rtol = 1e-6, atol = 0.0 }\n'))
    assert case.expect.tolerance["loss"].rtol == 1e-6 and case.expect.tolerance_source["loss"] == "case"
    assert case.expect.tolerance_source["grad_norm"] == "default for float32"


def test_bf16_setup_gets_bf16_default_tolerances(write_case):
    case = load_case(write_case(GOOD.replace("dp_shard = 1", 'dp_shard = 1\nparam_dtype = "bfloat16"')))
    assert case.expect.tolerance["grad_norm"].rtol == DEFAULT_TOLERANCES["bfloat16"]["grad_norm"][0]


@pytest.mark.parametrize("edit, key, allowed", [
    (("[train]", "[train]\nbogus = 1"), "train.bogus", "unknown key"),
    (('dp_shard = 1', 'dp_shard = 1\nwat = 2'), "setups.b.wat", "unknown key"),
    (('dp_shard = 1', 'dp_shard = 1\nworld_size = 4'), "setups.b.world_size", "does not factor"),
    (('dp_replicate = 8\n[setups.b]', 'dp_replicate = 4\ndp_shard = 2\n[setups.b]'), "setups.a.dp_shard", "replicate does not shard"),
    (('dp_shard = 1', 'dp_shard = 1\ntp = 3'), "setups.b.tp", "does not divide n_heads"),
    (('dp_shard = 1', 'dp_shard = 1\npp = 8'), "setups.b.pp", "exceed"),
    (('dp_shard = 1', 'dp_shard = 1\nmicrobatches = 3'), "setups.b.microbatches", "does not divide the local batch"),
    (('model = "tiny"', 'model = "huge"'), "train.model", "debugmodel"),
    (('model = "tiny"', 'model = "tiny"\ndtype = "float16"'), "train.dtype", "bfloat16"),
    (('dp_api = "replicate"', 'dp_api = "zero3"'), "setups.a.dp_api", "fully_shard"),
    (('description = "two setups"', ''), "description", "required"),
])
def test_each_mistake_is_one_line_naming_file_and_key(write_case, edit, key, allowed):
    path = write_case(GOOD.replace(*edit))
    with pytest.raises(SpecError) as e:
        load_case(path)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"{path}: {key}:"), msg
    assert allowed in msg, msg


def test_one_setup_is_not_a_case(write_case):
    with pytest.raises(SpecError, match="setups: need two or more"):
        load_case(write_case('description = "x"\n[setups.a]\ndp_api = "none"\n'))


def test_invalid_toml(write_case):
    with pytest.raises(SpecError, match="not valid TOML"):
        load_case(write_case("description = \n"))


def test_every_committed_case_loads():
    from parity.case.loader import find_case_files

    paths = find_case_files("cases")
    assert paths, "no cases/*.toml found"
    for p in paths:
        load_case_of_any_trainer(p)
