"""What makes a run trustworthy on any device: repeat check, device and kernel checks up front, records."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from parity.core import records
from parity.plugin import markers_for
from parity.case.attention import ATTENTION_DTYPES, check_attention
from parity.case.loader import load_case
from parity.case.schema import ATTENTION, DTYPES, BackendError, SpecError

REPO = Path(__file__).resolve().parent.parent

NOISY = """
description = "the reference's repeat run gets a few-ULP nudge on its gradients at step 2"
[train]
model = "tiny"
steps = 3
global_batch = 4
seq_len = 16
[setups.base]
dp_api = "none"
fault = "noise"
[setups.again]
dp_api = "none"
"""

HEALTHY = """
description = "replicate against HSDP (2, 1), its reference run twice"
[train]
model = "tiny"
steps = 3
global_batch = 4
seq_len = 16
attention = "{attention}"
[setups.replicate]
dp_api = "replicate"
dp_replicate = 2
[setups.hsdp]
dp_api = "fully_shard"
dp_replicate = 2
dp_shard = 1
"""


def parity(args, cwd, seed_cache):
    return subprocess.run([sys.executable, "-m", "parity.cli", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=600, env=dict(os.environ, PARITY_CACHE=str(seed_cache)))


@pytest.mark.slow
def test_planted_nondeterminism_is_caught_at_its_step(write_case, tmp_path, seed_cache):
    path = write_case(NOISY, "noisy")
    base = ["run", path, "--device", "cpu", "--no-report", "--baselines", tmp_path / "b", "--update-baselines=new"]
    r = parity(base + ["--repeat", "--out", tmp_path / "o1"], tmp_path, seed_cache)
    assert r.returncode == 1, r.stdout + r.stderr
    assert ("repeat check (base twice, bitwise): FAIL: nondeterministic reference: base run twice in one launch "
            "differs first at step 2 on grad_norm") in r.stdout
    verdict = records.read_json(tmp_path / "o1" / "noisy" / "verdict.json")
    assert verdict["problems"][0].startswith("nondeterministic reference")
    assert verdict["pairs"][0]["passed"]  # the setups agree: only the repeat check could catch it
    assert "wrote nothing: the case failed" in r.stdout and not (tmp_path / "b").exists()
    # Without the repeat check the planted noise goes unseen: it only touches the repeat run.
    r = parity(base + ["--no-repeat", "--out", tmp_path / "o2"], tmp_path, seed_cache)
    assert r.returncode == 0, r.stdout + r.stderr
    assert not (tmp_path / "o2" / "noisy" / "base.repeat").exists()
    assert (tmp_path / "b" / "noisy" / "base.cpu.csv").is_file()


@pytest.mark.slow
def test_repeat_passes_and_run_json_records_determinism_fingerprint_timeout(write_case, tmp_path, seed_cache):
    path = write_case(HEALTHY.format(attention="flash") + "[expect]\nrepeat = true\n", "healthy")
    r = parity(["run", path, "--device", "cpu", "--no-report", "--out", tmp_path / "o", "--timeout", "300",
                "--baselines", tmp_path / "b", "--update-baselines=new"], tmp_path, seed_cache)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "repeat check (replicate twice, bitwise): PASS" in r.stdout  # on by the case's [expect] repeat
    assert "healthy: PASS on cpu/gloo" in r.stdout and "cases per device: cpu/gloo 1" in r.stdout
    run = records.read_json(tmp_path / "o" / "healthy" / "replicate.repeat" / "run.json")
    assert run["status"] == "ok" and run["backend"] == "gloo"
    assert run["pg_timeout_s"] > 300  # the process group never times out before the launcher does
    assert run["determinism"]["settings"]["deterministic_algorithms"] is True
    assert run["determinism"]["in_effect"]["deterministic_algorithms"] is True
    assert run["determinism"]["env"]["NCCL_ALGO"] == "Ring" and run["determinism"]["relaxed"] == []
    fp = run["fingerprint"]
    assert fp["cpu_capability"] == torch.backends.cpu.get_cpu_capability() and fp["threads"] == 1
    header, _ = records.read_csv(tmp_path / "b" / "healthy" / "replicate.cpu.csv")
    assert header["threads"] == "1" and header["cpu_model"] == fp["cpu_model"]
    assert not list((tmp_path / "b" / "healthy").glob("*.repeat.*"))  # the repeat run makes no baseline


def test_device_cuda_without_enough_gpus_exits_2_naming_case_and_counts(tmp_path, seed_cache):
    if torch.cuda.device_count() >= 8:
        pytest.skip("this machine has 8 GPUs")
    out = tmp_path / "out"
    r = parity(["run", REPO / "cases" / "replicate_vs_hsdp.toml", "--device", "cuda", "--out", out], REPO, seed_cache)
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert "case replicate_vs_hsdp needs 8 GPUs" in r.stderr and f"{torch.cuda.device_count()} visible" in r.stderr
    assert not out.exists()


def test_backend_without_a_kernel_exits_2_before_anything_runs(write_case, tmp_path, seed_cache):
    path = write_case(HEALTHY.format(attention="efficient"), "eff")
    out = tmp_path / "out"
    r = parity(["run", path, "--device", "cpu", "--out", out], tmp_path, seed_cache)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert f"{path}: setups.replicate.attention: 'efficient' has no cpu kernel; allowed on cpu: math, flash" in r.stderr
    assert not out.exists()


@pytest.mark.parametrize("attention,dtype,problem", [
    ("flash", "float32", "'flash' cannot run in float32 on cuda (it needs bfloat16); allowed in float32: math, efficient"),
    ("cudnn", "float32", "'cudnn' cannot run in float32 on cuda"),
    ("efficient", "float64", "'efficient' cannot run in float64 on cuda"),
    ("cudnn", "bfloat16", "'cudnn' has no deterministic backward"),
    ("flash", "bfloat16", None),
    ("efficient", "float32", None),
])
def test_cuda_kernels_checked_up_front(write_case, attention, dtype, problem):
    case = load_case(write_case(HEALTHY.format(attention=attention).replace("[train]", f'[train]\ndtype = "{dtype}"')))
    if problem is None:
        check_attention(case, "cuda")
        return
    with pytest.raises(BackendError) as e:
        check_attention(case, "cuda")
    assert str(e.value).startswith(f"{case.path}: setups.replicate.attention: {problem}")


def test_cudnn_allowed_when_the_case_relaxes_determinism(write_case):
    text = HEALTHY.format(attention="cudnn").replace("[train]", '[train]\ndtype = "bfloat16"')
    check_attention(load_case(write_case(text + "[determinism]\ndeterministic_algorithms = false\n")), "cuda")


def test_cpu_attention_table_is_what_this_torch_runs():
    """The CPU entries of ATTENTION_DTYPES (validation, the `cpu` marker, README) against real kernels."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = {"math": SDPBackend.MATH, "flash": SDPBackend.FLASH_ATTENTION,
                "efficient": SDPBackend.EFFICIENT_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}
    runs = {}
    for name in ATTENTION:
        for dtype in DTYPES:
            q = torch.randn(2, 4, 16, 8, dtype=getattr(torch, dtype), requires_grad=True)
            try:
                with sdpa_kernel([backends[name]]):
                    F.scaled_dot_product_attention(q, q, q, is_causal=True).sum().backward()
                runs.setdefault(name, []).append(dtype)
            except RuntimeError:
                pass
    assert runs == {name: list(dtypes) for name, dtypes in ATTENTION_DTYPES["cpu"].items()}


def test_cpu_marker_follows_the_kernels(write_case):
    assert "cpu" in markers_for(load_case(write_case(HEALTHY.format(attention="flash"))))
    assert "cpu" not in markers_for(load_case(write_case(HEALTHY.format(attention="efficient"))))


@pytest.mark.parametrize("extra,message", [
    ("[determinism]\ntf32 = 1\n", "determinism.tf32: 1 is not allowed; allowed: true, false"),
    ("[determinism]\nnccl_algo = \"NVLS\"\n", "determinism.nccl_algo: 'NVLS' is not allowed; allowed: Ring, Tree, auto"),
    ("[determinism]\nwarn_only = true\n", "determinism.warn_only: unknown key"),
    ("[expect]\nrepeat = \"yes\"\n", "expect.repeat: 'yes' is not allowed; allowed: true, false"),
    ("[setups.other]\ndp_api = \"none\"\nfault = \"noise\"\n", "setups.other.fault: \"noise\" perturbs the reference's"),
    ("[setups.\"replicate.repeat\"]\ndp_api = \"none\"\n", "setups.'replicate.repeat': 'replicate.repeat' is not a valid name"),
])
def test_bad_determinism_repeat_and_noise_keys(write_case, extra, message):
    path = write_case(HEALTHY.format(attention="math") + extra)
    with pytest.raises(SpecError) as e:
        load_case(path)
    assert str(e.value).startswith(f"{path}: {message}")


def test_relaxed_setting_is_carried(write_case):
    case = load_case(write_case(HEALTHY.format(attention="math") + "[determinism]\nnccl_algo = \"Tree\"\n"))
    assert case.determinism["nccl_algo"] == "Tree" and case.determinism["nccl_nvls"] is False


def test_gpu_check_cases_are_world_size_1_and_run_on_cuda_as_written():
    """scripts/gpu-check's cases: one GPU, kernels that exist there in their dtypes, repeat on."""
    paths = sorted((REPO / "scripts" / "gpu-cases").glob("*.toml"))
    assert [p.stem for p in paths] == ["ws1_bf16_flash", "ws1_float32", "ws1_noise"]
    for p in paths:
        case = load_case(p)
        check_attention(case, "cuda")
        assert case.world_size == 1 and case.expect.repeat is True
    assert load_case(paths[0]).reference.train.attention == "flash"


def test_device_resolution_never_falls_back_quietly(write_case):
    from parity.run.runner import DeviceError, resolve_device, wants_repeat

    case = load_case(write_case(HEALTHY.format(attention="math")))
    assert resolve_device("auto", case, gpus=1) == "cpu"  # auto may choose CPU; the verdict then says so
    assert resolve_device("auto", case, gpus=2) == "cuda"
    assert resolve_device("cuda", case, gpus=2) == "cuda"
    with pytest.raises(DeviceError, match=r"case case needs 2 GPUs \(one per rank of its largest setup\), 1 visible"):
        resolve_device("cuda", case, gpus=1)
    flash32 = load_case(write_case(HEALTHY.format(attention="flash"), "flash32"))
    assert resolve_device("auto", flash32, gpus=0) == "cpu"  # CPU has a float32 flash kernel
    with pytest.raises(BackendError, match="'flash' cannot run in float32 on cuda"):
        resolve_device("auto", flash32, gpus=2)
    # repeat: the command line, else the case, else on for CUDA only
    assert (wants_repeat(case, "cuda"), wants_repeat(case, "cpu")) == (True, False)
    on = load_case(write_case(HEALTHY.format(attention="math") + "[expect]\nrepeat = true\n", "on"))
    assert wants_repeat(on, "cpu") is True and wants_repeat(on, "cpu", requested=False) is False
