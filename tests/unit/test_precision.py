"""fed_netgpt/model/precision.py: parsing train.bf16, the auto choice on CPU and CUDA, the benchmark cache, the
step benchmark, and the engine's measured choice."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from fed_netgpt.data.schema import PromptPair
from fed_netgpt.model import grouped_lora, precision
from fed_netgpt.model.adapters import attach_adapter, get_state
from fed_netgpt.model.base import DeviceError, resolve_device
from fed_netgpt.model.precision import (
    Precision,
    choose_precision,
    cpu_has_amx,
    device_name,
    parse_bf16_setting,
    step_benchmark,
)
from fed_netgpt.training import engine
from fed_netgpt.training.batches import collate
from fed_netgpt.training.engine import SiteJob, train_sites
from fed_netgpt.training.privacy import SiteAccountant
from fed_netgpt.training.reference import train_adapter

CUDA = torch.device("cuda")


def _times(bf16_seconds: float, fp32_seconds: float):
    """A fake benchmark: seconds per step for bf16 and fp32, and the list of calls it got."""
    calls: list[bool] = []

    def benchmark(bf16: bool) -> float:
        calls.append(bf16)
        return bf16_seconds if bf16 else fp32_seconds

    return benchmark, calls


def _never(bf16: bool) -> float:
    raise AssertionError("the benchmark ran although its result was cached")


@pytest.fixture
def gpu_with_bf16(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)


# ---- parse_bf16_setting ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [("auto", "auto"), ("AUTO", "auto"), ("true", "true"), ("True", "true"), ("false", "false"),
     ("False", "false"), (" true ", "true"), (True, "true"), (False, "false")],
)
def test_parse_accepts_every_spelling(value, expected):
    # Execute / Assert
    assert parse_bf16_setting(value) == expected


@pytest.mark.parametrize("value", ["yes", "", "bf16", 1, None])
def test_parse_rejects_anything_else(value):
    # Execute / Assert
    with pytest.raises(ValueError, match="train.bf16 must be auto, true or false; got"):
        parse_bf16_setting(value)


# ---- explicit settings and CPU auto ----------------------------------------------------------


@pytest.mark.parametrize("device", [torch.device("cpu"), CUDA])
def test_true_and_false_are_obeyed(device, monkeypatch):
    # Prepare: the machine would say the opposite of each setting
    monkeypatch.setattr(precision, "cpu_has_amx", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)

    # Execute
    on, off = choose_precision("true", device, benchmark=_never), choose_precision(False, device, benchmark=_never)

    # Assert
    assert on == Precision(True, "bf16: set by train.bf16")
    assert off == Precision(False, "fp32: set by train.bf16")


@pytest.mark.parametrize("amx", [True, False])
def test_cpu_auto_without_a_benchmark_follows_amx(amx, monkeypatch):
    # Prepare
    monkeypatch.setattr(precision, "cpu_has_amx", lambda: amx)

    # Execute
    chosen = choose_precision("auto", torch.device("cpu"))

    # Assert
    assert chosen.bf16 is amx
    assert "AMX" in chosen.reason and "not measured" in chosen.reason
    assert chosen.reason.startswith("bf16" if amx else "fp32")


@pytest.mark.parametrize("amx", [True, False])
def test_cpu_auto_with_a_benchmark_follows_the_timing_not_the_flags(amx, monkeypatch, tmp_path):
    # Prepare: the flags say one thing, the timing the opposite (AMD EPYC without AMX: bf16 1.32x faster)
    monkeypatch.setattr(precision, "cpu_has_amx", lambda: amx)
    benchmark, calls = _times(1.0, 0.5) if amx else _times(1.669, 2.212)

    # Execute
    chosen = choose_precision("auto", torch.device("cpu"), benchmark, cache_key="epyc", cache_file=tmp_path / "p.json")

    # Assert
    assert chosen.bf16 is not amx
    assert sorted(calls) == [False, True]
    assert "this CPU" in chosen.reason and "measured" in chosen.reason


def test_other_devices_use_fp32():
    # Execute
    chosen = choose_precision("auto", torch.device("mps"), benchmark=_never)

    # Assert
    assert not chosen.bf16


def test_cpu_has_amx_reads_this_machine():
    # Prepare
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        pytest.skip("no /proc/cpuinfo here")
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.read_text().splitlines()
                  if line.startswith("flags")), None)
    if flags is None:
        pytest.skip("/proc/cpuinfo has no flags line")

    # Execute / Assert
    assert cpu_has_amx() == ("amx_bf16" in flags)


def test_device_name_keys_the_cpu_model_and_threads():
    # Execute
    name = device_name(torch.device("cpu"))

    # Assert
    assert name.endswith(f"({torch.get_num_threads()} threads)") and len(name) > len(" (1 threads)")


PAIRS = [PromptPair("paris", "france", "Status of link A?", "Link A is up."),
         PromptPair("lyon", "france", "Latency to Paris?", "About 4 ms.")]


def test_the_reference_loop_with_auto_times_this_cpu_once_and_caches_it(tiny_base, default_config, adapter_name,
                                                                        monkeypatch, tmp_path):
    # Prepare: a fresh process-wide choice and an empty cache
    monkeypatch.setenv("FED_NETGPT_CACHE", str(tmp_path))
    monkeypatch.setattr(engine, "PRECISION_CHOSEN", {})
    model = attach_adapter(tiny_base, adapter_name, default_config.lora)
    config = replace(default_config.train, bf16="auto", local_steps=1, batch_size=2)

    # Execute
    result = train_adapter(model, adapter_name, tiny_base.tokenizer, PAIRS, config)

    # Assert: one entry, keyed on this CPU, the model and the batch, and the step used what it says
    cache = json.loads((tmp_path / "precision.json").read_text())
    key = f"{device_name(torch.device('cpu'))}|{model.name_or_path}|2"
    assert list(cache) == [key]
    entry = cache[key]
    assert entry["bf16_seconds"] > 0 and entry["fp32_seconds"] > 0
    assert result.metrics["bf16"] == float(entry["bf16_seconds"] * precision.MIN_SPEEDUP < entry["fp32_seconds"])
    # another batch size in the same process is timed on its own, not given the first one's choice
    train_adapter(model, adapter_name, tiny_base.tokenizer, PAIRS, replace(config, batch_size=1))
    cache = json.loads((tmp_path / "precision.json").read_text())
    assert sorted(cache) == sorted([key, f"{device_name(torch.device('cpu'))}|{model.name_or_path}|1"])


@pytest.mark.parametrize("private", [False, True], ids=["plain", "sample_dp"])
def test_a_pack_and_a_private_pass_time_their_own_step_with_auto_and_log_it(tiny_base, default_config, adapter_name,
                                                                            monkeypatch, tmp_path, caplog, private):
    # Prepare: a fresh process-wide choice, an empty cache, a pack of two sites (plain) or one site under DP-SGD
    monkeypatch.setenv("FED_NETGPT_CACHE", str(tmp_path))
    monkeypatch.setattr(engine, "PRECISION_CHOSEN", {})
    start = get_state(attach_adapter(tiny_base, adapter_name, default_config.lora), adapter_name)
    config = replace(default_config.train, bf16="auto", local_steps=1, batch_size=2)
    privacy = replace(default_config.privacy, mode="sample_dp", noise_multiplier=1.0)
    jobs = ([SiteJob("paris", PAIRS, start, accountant=SiteAccountant(privacy, 1, []))] if private else
            [SiteJob("paris", PAIRS, start), SiteJob("lyon", PAIRS[::-1], start)])

    # Execute
    with caplog.at_level("INFO", logger="fed_netgpt.training.engine"):
        results = train_sites(tiny_base, jobs, default_config.lora, config)

    # Assert: the grouped step itself was timed (its own cache entry), never the CPU-flag rule, and logged once
    cache = json.loads((tmp_path / "precision.json").read_text())
    kind = "grouped-dp-1" if private else "grouped-2"
    key = f"{device_name(torch.device('cpu'))}|{tiny_base.model.name_or_path}|2|{kind}"
    assert list(cache) == [key]
    entry = cache[key]
    assert all(r.metrics["bf16"] == float(entry["bf16_seconds"] * precision.MIN_SPEEDUP < entry["fp32_seconds"])
               for r in results)
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("precision")]
    assert len(logged) == 1 and "measured" in logged[0] and "not measured" not in logged[0], logged


@pytest.mark.parametrize("engine_name", ["grouped", "opacus"])
def test_dp_training_times_its_own_step_and_its_timing_leaves_no_trace(tiny_base, default_config, monkeypatch,
                                                                       tmp_path, engine_name):
    # Prepare: two DP-SGD rounds from one start with the same seeded draws (q = 1/2) and negligible noise, every
    # pair's gradient clipped: one with auto (it times the DP step on the first two pairs, made to pick fp32
    # whatever it measures), one with fp32 set (no timing)
    monkeypatch.setenv("FED_NETGPT_CACHE", str(tmp_path))
    monkeypatch.setattr(engine, "PRECISION_CHOSEN", {})
    monkeypatch.setattr(precision, "MIN_SPEEDUP", 1e9)
    privacy = replace(default_config.privacy, mode="sample_dp", noise_multiplier=1e-12, max_grad_norm=1e-5,
                      engine=engine_name, reproducible=True)
    pairs = [*PAIRS, PromptPair("nice", "france", "Status of link B?", "Link B is down, since noon."),
             PromptPair("nantes", "france", "Loss on link C?", "None in the last hour.")]
    start = get_state(attach_adapter(tiny_base, "dp-probe", default_config.lora, seed=3), "dp-probe")
    start = {k: v + 0.01 for k, v in start.items()}  # B != 0: no weight with a zero gradient, which AdamW would
    # move by the sign of the (tiny) noise alone
    states, kept = {}, []
    clipped_sums = grouped_lora.RowGradients.clipped_sums

    def counted(self, *args, **kwargs):  # how many factors' gradients a step clips
        kept.append(len(self.norms))
        return clipped_sums(self, *args, **kwargs)

    monkeypatch.setattr(grouped_lora.RowGradients, "clipped_sums", counted)
    for bf16 in ("auto", "false"):
        config = replace(default_config.train, bf16=bf16, local_steps=2, batch_size=2, learning_rate=1e-2)

        # Execute
        (result,) = train_sites(tiny_base, [SiteJob("paris", pairs, start, accountant=SiteAccountant(privacy, 2, []))],
                                default_config.lora, config)
        states[bf16] = result.state

    # Assert: the DP step has a cache entry of its own, and the timing passes' per-pair gradients were neither
    # clipped nor stepped with: both rounds took the same steps (their draws and noise seeded alike), and each
    # step clipped the gradients of its own pass only (2 layers x q, k, v, o x A, B)
    assert kept == ([16] * 4 if engine_name == "grouped" else [])
    for key, value in states["false"].items():
        np.testing.assert_allclose(states["auto"][key], value, rtol=0, atol=1e-7, err_msg=key)
    cache = json.loads((tmp_path / "precision.json").read_text())
    kind = "grouped-dp-1" if engine_name == "grouped" else "dp-sgd"
    assert list(cache) == [f"{device_name(torch.device('cpu'))}|{tiny_base.model.name_or_path}|2|{kind}"]


# ---- CUDA auto: capability, benchmark, cache --------------------------------------------------


def test_cuda_without_bf16_support_is_fp32(monkeypatch, tmp_path):
    # Prepare
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)

    # Execute
    chosen = choose_precision("auto", CUDA, benchmark=_never, cache_file=tmp_path / "precision.json")

    # Assert
    assert not chosen.bf16
    assert not (tmp_path / "precision.json").exists()


def test_cuda_without_benchmark_trusts_support(gpu_with_bf16):
    # Execute / Assert
    assert choose_precision("auto", CUDA).bf16


@pytest.mark.parametrize(
    ("bf16_seconds", "fp32_seconds", "expected"),
    [(1.0, 2.0, True), (2.0, 1.0, False), (0.97, 1.0, False), (1.0, 0.97, False)],
    ids=["bf16-faster", "bf16-slower", "bf16-within-5%-faster", "bf16-within-5%-slower"],
)
def test_cuda_benchmark_decides(bf16_seconds, fp32_seconds, expected, gpu_with_bf16, tmp_path):
    # Prepare
    benchmark, calls = _times(bf16_seconds, fp32_seconds)

    # Execute
    chosen = choose_precision("auto", CUDA, benchmark, cache_key="H200/smollm2/8", cache_file=tmp_path / "p.json")

    # Assert
    assert chosen.bf16 is expected
    assert sorted(calls) == [False, True]
    assert chosen.reason.startswith("bf16" if expected else "fp32") and "measured" in chosen.reason


def test_cuda_benchmark_is_cached_per_key(gpu_with_bf16, tmp_path):
    # Prepare: a first run measures and writes the cache
    cache_file = tmp_path / "sub" / "precision.json"
    benchmark, _ = _times(1.0, 2.0)
    first = choose_precision("auto", CUDA, benchmark, cache_key="gpu-a", cache_file=cache_file)

    # Execute
    again = choose_precision("auto", CUDA, _never, cache_key="gpu-a", cache_file=cache_file)
    other_benchmark, other_calls = _times(2.0, 1.0)
    other = choose_precision("auto", CUDA, other_benchmark, cache_key="gpu-b", cache_file=cache_file)

    # Assert
    assert first.bf16 and again.bf16 and "cached" in again.reason
    assert sorted(other_calls) == [False, True] and not other.bf16
    assert set(json.loads(cache_file.read_text())) == {"gpu-a", "gpu-b"}


def test_unreadable_cache_is_measured_again(gpu_with_bf16, tmp_path):
    # Prepare
    cache_file = tmp_path / "precision.json"
    cache_file.write_text("not json")
    benchmark, calls = _times(1.0, 2.0)

    # Execute
    chosen = choose_precision("auto", CUDA, benchmark, cache_key="k", cache_file=cache_file)

    # Assert
    assert chosen.bf16 and calls
    assert "k" in json.loads(cache_file.read_text())


# ---- step_benchmark on the tiny model ---------------------------------------------------------


def test_step_benchmark_times_without_changing_the_model(tiny_base, default_config, adapter_name):
    # Prepare
    model = attach_adapter(tiny_base, adapter_name, default_config.lora)
    pairs = [PromptPair("paris", "france", "Status of link A?", "Link A is up."),
             PromptPair("lyon", "france", "Latency to Paris?", "About 4 ms.")]
    batch = collate(tiny_base.tokenizer, pairs, default_config.train.max_length)
    before, was_training = get_state(model, adapter_name), model.training

    # Execute
    benchmark = step_benchmark(model, batch, repeats=2)
    seconds = {bf16: benchmark(bf16) for bf16 in (True, False)}

    # Assert
    assert all(isinstance(s, float) and s > 0 for s in seconds.values())
    after = get_state(model, adapter_name)
    assert before.keys() == after.keys()
    assert all(np.array_equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in model.parameters())
    assert model.training is was_training


def test_auto_device_is_what_the_process_sees_and_cuda_without_one_is_a_clear_error():
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="train.device=cuda, but this process sees no CUDA device"):
            resolve_device("cuda")
