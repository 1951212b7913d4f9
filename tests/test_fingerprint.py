"""Platform key, fingerprint, determinism settings: what makes two runs' bits comparable."""

import os
import subprocess
import sys

import pytest
import torch

from parity.core.determinism import DETERMINISM, determinism_summary, nccl_env
from parity.core.fingerprint import BIT_FIELDS, differing_fields, fingerprint, platform_key


@pytest.mark.parametrize("name,sms,key", [
    ("cpu", None, "cpu"),
    ("NVIDIA H100 80GB HBM3", 132, "cuda-h100-sm132"),
    ("NVIDIA H100 PCIe", 114, "cuda-h100-sm114"),
    ("NVIDIA H200", 132, "cuda-h200-sm132"),
    ("NVIDIA A100-SXM4-80GB", 108, "cuda-a100-sm108"),
    ("Tesla V100-SXM2-16GB", 80, "cuda-v100-sm80"),
    ("NVIDIA L40S", 142, "cuda-l40s-sm142"),
    ("NVIDIA GeForce RTX 4090", 128, "cuda-nvidia-geforce-rtx-4090-sm128"),
    ("NVIDIA H100 80GB HBM3", None, "cuda-h100"),
])
def test_platform_key(name, sms, key):
    assert platform_key(name, sms) == key


def test_h100_sxm_and_pcie_do_not_share_a_baseline():
    assert platform_key("NVIDIA H100 80GB HBM3", 132) != platform_key("NVIDIA H100 PCIe", 114)


def test_differing_fields_name_what_changes_bits():
    cuda = {"torch": "2.11.0+cu128", "gpu": "NVIDIA H100 80GB HBM3", "sm_count": "132", "compute_capability": "9.0",
            "cuda": "12.8", "cudnn": "91002", "nccl": "2.27.3", "driver": "570.1",
            "determinism": determinism_summary(DETERMINISM)}
    assert differing_fields("cuda-h100-sm132", cuda, dict(cuda)) == []
    other = {**cuda, "nccl": "2.28.0", "driver": "575.0", "gpu_count": "8"}  # gpu_count does not change bits
    assert differing_fields("cuda-h100-sm132", cuda, other) == ["nccl", "driver"]
    relaxed = {**cuda, "determinism": determinism_summary({**DETERMINISM, "tf32": True})}
    assert differing_fields("cuda-h100-sm132", cuda, relaxed) == ["determinism"]
    assert BIT_FIELDS["cpu"] == ("torch", "cpu_model", "cpu_capability", "threads")
    cpu = {"torch": "2.13.0+cpu", "cpu_model": "AMD EPYC", "cpu_capability": "AVX512"}  # threads not recorded
    assert differing_fields("cpu", cpu, {**cpu, "threads": 1}) == []
    assert differing_fields("cpu", cpu, {**cpu, "threads": 2}) == ["threads"]
    assert differing_fields("cpu", cpu, {**cpu, "cpu_capability": "AVX2", "threads": 1}) == ["cpu_capability"]
    # A baseline from before the CPU model was recorded is no exact reference for any CPU.
    old = {"torch": "2.13.0+cpu", "cpu_capability": "AVX512"}
    assert differing_fields("cpu", old, {**cpu, "threads": 1}) == ["cpu_model"]


def test_nccl_env_pins_algorithm_protocol_channels_and_disables_nvls_collnet():
    env = nccl_env(DETERMINISM)
    assert env == {"NCCL_ALGO": "Ring", "NCCL_PROTO": "Simple", "NCCL_MIN_NCHANNELS": "1", "NCCL_MAX_NCHANNELS": "1",
                   "NCCL_NVLS_ENABLE": "0", "NCCL_COLLNET_ENABLE": "0"}
    relaxed = nccl_env({**DETERMINISM, "nccl_algo": "auto", "nccl_channels": 0})
    assert relaxed["NCCL_ALGO"] is None and relaxed["NCCL_MIN_NCHANNELS"] is None


def test_apply_determinism_and_fingerprint_in_a_fresh_process():
    """In a process of its own (the settings are process-global): what run.json records."""
    code = ("import json, os, torch; os.environ['NCCL_DEBUG'] = 'WARN'; os.environ['NCCL_ALGO'] = 'Tree'\n"
            "from parity.core.determinism import DETERMINISM, apply_determinism\n"
            "from parity.core.fingerprint import fingerprint\n"
            "r = apply_determinism({**DETERMINISM, 'reduced_precision_reduction': True})\n"
            "print(json.dumps({'r': r, 'fp': fingerprint(torch.device('cpu'))}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    import json

    got = json.loads(out.stdout)
    r, fp = got["r"], got["fp"]
    assert r["relaxed"] == ["reduced_precision_reduction"]
    assert r["in_effect"]["deterministic_algorithms"] is True and r["in_effect"]["warn_only"] is False
    assert r["in_effect"]["matmul_allow_tf32"] is False and r["in_effect"]["cudnn_allow_tf32"] is False
    assert r["in_effect"]["cudnn_deterministic"] is True and r["in_effect"]["cudnn_benchmark"] is False
    assert r["in_effect"]["allow_bf16_reduced_precision_reduction"] is True
    assert r["env"]["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert r["env"]["NCCL_ALGO"] == "Ring"  # the pinned value wins over the environment's
    assert r["env"]["NCCL_DEBUG"] == "WARN"  # every NCCL variable in effect is recorded
    assert fp["platform"] == "cpu" and fp["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert fp["threads"] == 1 and "gpu" not in fp


def test_fingerprint_command_prints_json():
    out = subprocess.run([sys.executable, "-m", "parity.core.fingerprint", "--device", "cpu"], capture_output=True,
                         text=True, check=True)
    import json

    doc = json.loads(out.stdout)
    assert doc["fingerprint"]["platform"] == "cpu" and doc["determinism"]["relaxed"] == []


def test_fingerprint_of_this_process():
    fp = fingerprint(torch.device("cpu"))
    assert fp["torch"] == torch.__version__ and fp["device_type"] == "cpu"
