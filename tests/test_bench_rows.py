"""Benchmarks keep their numbers (RowLog), and their ideal counts what the attention density allows (attention_time)."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import textwrap
import types

import pytest
import torch
import torch.nn.functional as F

import sparsify
from sparsify import patterns

BENCHMARKS = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import attention_time  # noqa: E402
import e2e_bench  # noqa: E402
from bench_rows import RowLog  # noqa: E402

# Kernel names as torch.profiler recorded them on H100 / H200 runs (torch 2.11, cuDNN 9, FA4 CuTe DSL).
ATTENTION_KERNELS = {
    "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7_64x128x128_4x1x1_kernel0_0": "cudnn",
    "cudnn_generated_fort_native_sdpa_sm80_flash_fprop_wmma_f16_knob_3_64x64x128_4x1x1_kernel0_0": "cudnn",
    "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4, false, false, cutlass::bfloat16_t, "
    "Flash_kernel_traits<128, 128, 64, 4, cutlass::bfloat16_t> >, false, false, false, false, true, true, false, "
    "false>(pytorch_flash::Flash_fwd_params)": "flash",
    "void pytorch_flash::flash_fwd_splitkv_combine_kernel<Flash_fwd_kernel_traits<128, 64, 128, 4>, 4, 1, true>"
    "(pytorch_flash::Flash_fwd_params)": "flash",
    "kernel_cutlass_kernel_flash_attncuteflash_fwd_sm90FlashAttentionForwardSm90_object_at__tensor0000o11101213_"
    "tensor0000o11101213_0": "flash",
    "flash_fwd_sm100_bf16_head_dim128_tile128x128_threads384_kernel_cutlass_kernel_flash_attncuteflash_fwd_sm100"
    "FlashAttentionForwardSm100_object_at__tensor0000o1110_0": "flash",
    "fmha_cutlassF_bf16_aligned_64x128_rf_sm80(PyTorchMemEffAttention::AttentionKernel<cutlass::bfloat16_t, "
    "cutlass::arch::Sm80, true, 64, 128, 128, true, true>::Params)": "efficient",
    "_block_sparse_fwd_kernel": "sparsify",
    "triton_tem_fused_flex_attention_0": "flex",
}
OTHER_KERNELS = [
    # Inductor kernels named after the ATen ops they were fused from: layout copies around SDPA, not attention.
    "triton_poi_fused__scaled_dot_product_cudnn_attention_transpose_view_0",
    "triton_poi_fused__scaled_dot_product_flash_attention_clone_1",
    "triton_per_fused_native_layer_norm_0",
    "triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_2",
    "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_segment_k_off_kernel"
    "__5x_cublas",
    "nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NTN",
    "void at::native::vectorized_elementwise_kernel<4, at::native::BinaryFunctor<c10::BFloat16, c10::BFloat16, "
    "c10::BFloat16, at::native::binary_internal::MulFunctor<float> >, std::array<char*, 3ul> >(int, "
    "at::native::BinaryFunctor<c10::BFloat16, c10::BFloat16, c10::BFloat16, "
    "at::native::binary_internal::MulFunctor<float> >, std::array<char*, 3ul>)",
    "void at::native::(anonymous namespace)::cunn_SoftMaxForward<8, float, float, float, "
    "at::native::(anonymous namespace)::SoftMaxForwardEpilogue>(float*, float const*, int)",
    "Memcpy DtoD (Device -> Device)",
    "Memset (Device)",
]


def test_a_row_survives_a_crash(tmp_path):
    path = tmp_path / "bench.json"
    with pytest.raises(RuntimeError, match="out of memory"):
        with RowLog(path, meta={"device": "cpu"}, echo=False) as log:
            log.add(tokens=1024, speedup=1.5)
            log.add(tokens=2048, speedup=float("nan"))
            raise RuntimeError("CUDA out of memory")
    document = json.loads(path.read_text())
    assert document == {"meta": {"device": "cpu"}, "rows": [{"tokens": 1024, "speedup": 1.5},
                                                             {"tokens": 2048, "speedup": "nan"}], "complete": False}


def test_rows_survive_a_killed_process(tmp_path):
    """A process that dies without unwinding (a timeout's kill, a segfault) keeps every row it wrote."""
    path = tmp_path / "bench.json"
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(BENCHMARKS)!r})
        from bench_rows import RowLog
        log = RowLog({str(path)!r}, meta={{"run": "killed"}}, echo=False)
        log.add(step=0, ms=1.25)
        log.add(step=1, ms=2.5)
        os._exit(9)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 9, result.stderr
    document = json.loads(path.read_text())
    assert document["rows"] == [{"step": 0, "ms": 1.25}, {"step": 1, "ms": 2.5}] and document["complete"] is False


def test_a_finished_log_says_complete(tmp_path):
    path = tmp_path / "bench.json"
    with RowLog(path, echo=False) as log:
        assert json.loads(path.read_text()) == {"meta": {}, "rows": [], "complete": False}  # written at once
        log.add(ms=torch.tensor(2.0))
        log.update_meta(graph_breaks=0)
    assert json.loads(path.read_text()) == {"meta": {"graph_breaks": 0}, "rows": [{"ms": 2.0}], "complete": True}


@pytest.mark.parametrize("name", sorted(ATTENTION_KERNELS))
def test_attention_kernels_are_recognised_by_name(name):
    assert attention_time.attention_family(name) == ATTENTION_KERNELS[name]


@pytest.mark.parametrize("name", OTHER_KERNELS)
def test_other_kernels_are_not_attention(name):
    assert not attention_time.is_attention_kernel(name)


def _kernel(name: str, microseconds: float, device: str = "CUDA"):
    """A stand-in for a profiler kernel event (what `attention_time_from_events` reads of one)."""
    return types.SimpleNamespace(name=name, device_type=types.SimpleNamespace(name=device),
                                 time_range=types.SimpleNamespace(elapsed_us=lambda: microseconds), cpu_parent=None)


def test_cuda_attention_time_sums_only_attention_kernels_per_step():
    cudnn = next(name for name, family in ATTENTION_KERNELS.items() if family == "cudnn")
    flash = next(name for name, family in ATTENTION_KERNELS.items() if family == "flash")
    events = [_kernel(cudnn, 400.0), _kernel(OTHER_KERNELS[0], 90.0), _kernel(cudnn, 500.0),
              _kernel(OTHER_KERNELS[4], 700.0), _kernel(flash, 100.0),
              _kernel("cudaLaunchKernel", 5.0, device="CPU"), _kernel(cudnn, 33.0, device="CPU")]
    measured = attention_time.attention_time_from_events(events, steps=2, device_type="cuda")
    assert measured.attention_ms == pytest.approx((400 + 500 + 100) / 2 / 1e3) and measured.calls_per_step == 1.5
    assert measured.by_family == pytest.approx({"cudnn": 0.45, "flash": 0.05})
    assert measured.as_row() == {"attention_ms": 0.5, "attention_calls": 1.5, "attention_cudnn_ms": 0.45,
                                 "attention_flash_ms": 0.05}


def test_cpu_attention_time_counts_sdpa_once_and_not_the_rest():
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 256, 32, generator=generator) for _ in range(3))
    weight = torch.randn(32, 32, generator=generator)

    def step():
        return F.scaled_dot_product_attention(q @ weight, k, v) @ weight

    measured = attention_time.measure_attention_time(step, "cpu", steps=2)
    assert measured.calls_per_step == 1.0  # SDPA, not again its inner backend op, not the matmuls
    assert measured.source == "cpu operators" and 0 < measured.attention_ms == measured.by_family["operator"]
    assert 0 < measured.attention_ms < measured.profiled_step_ms
    # An unprofiled step of half the time: the attention keeps its share of it.
    half = measured.profiled_step_ms / 2
    assert measured.attention_ms_at(half) == pytest.approx(measured.attention_ms / 2)


def test_ideal_is_the_dense_step_less_the_attention_the_density_drops():
    assert attention_time.ideal_step_ms(600.0, 400.0, 0.15) == pytest.approx(600 - 400 + 0.15 * 400)
    assert attention_time.ideal_step_ms(600.0, 400.0, 1.0) == 600.0
    assert attention_time.fraction_of_ideal(260.0, 260.0) == 1.0
    with pytest.raises(ValueError, match="not measured in the same mode"):
        attention_time.ideal_step_ms(100.0, 150.0, 0.5)
    with pytest.raises(ValueError, match="density"):
        attention_time.ideal_step_ms(100.0, 50.0, 1.5)


def test_attention_density_is_kept_work_over_causal_visible_work_with_dense_sites_in_full():
    causal = sparsify.AttentionSite("self", 0, num_heads=2, num_kv_heads=2, head_dim=64, q_len=1024, k_len=1024,
                                    causal=True)
    cross = sparsify.AttentionSite("cross", 1, num_heads=2, num_kv_heads=2, head_dim=64, q_len=1024, k_len=128,
                                   is_self_attention=False)
    pattern = patterns.sliding_window(128)
    strategy = sparsify.Strategy.dense([causal, cross], block_size=64).with_heads("self", [pattern, pattern])
    kept = pattern.block_mask(16, 16, block_size=64, causal=True, q_len=1024, k_len=1024)
    causal_blocks = torch.ones(16, 16, dtype=torch.bool).tril()
    assert not (kept & ~causal_blocks).any()
    cross_blocks = 16 * 2
    expected = (2 * int(kept.sum()) + 2 * cross_blocks) / (2 * int(causal_blocks.sum()) + 2 * cross_blocks)
    assert attention_time.attention_density(strategy) == pytest.approx(expected)
    # At the lengths the model runs (another length than recorded), the same count at those lengths.
    longer = [sparsify.AttentionSite("self", 0, num_heads=2, num_kv_heads=2, head_dim=64, q_len=2048, k_len=2048,
                                     causal=True), cross]
    kept = pattern.block_mask(32, 32, block_size=64, causal=True, q_len=2048, k_len=2048)
    expected = (2 * int(kept.sum()) + 2 * cross_blocks) / (2 * 32 * 33 // 2 + 2 * cross_blocks)
    assert attention_time.attention_density(strategy, longer) == pytest.approx(expected)


def test_e2e_bench_smoke_run_writes_its_rows(tmp_path, capsys):
    out = tmp_path / "e2e.json"
    assert e2e_bench.main(["--device", "cpu", "--frames", "2", "--layers", "1", "--heads", "2", "--head-dim", "16",
                           "--repeats", "1", "--warmup", "1", "--batches", "2", "--attention-steps", "1",
                           "--out", str(out)]) == 0
    document = json.loads(out.read_text())
    assert document["complete"] is True and document["meta"]["modes"] == ["eager"]
    (row,) = document["rows"]
    assert row["mode"] == "eager" and row["tokens"] == 512 and "error" not in row
    assert 0 < row["attention_density"] <= 1 and row["attention_calls"] == 1  # one layer: one SDPA per step
    assert row["ideal_ms"] == pytest.approx(
        row["dense_ms"] - row["attention_ms"] * (1 - row["attention_density"]), abs=0.02)
    assert 0 < row["attention_ms"] < row["dense_ms"] and row["fraction_of_ideal"] > 0
    assert 0 <= row["output_rel_error"] < 0.2  # searched under max_error=0.05
    assert "row: mode=eager" in capsys.readouterr().out


def test_the_session_summary_shows_cut_runs_and_test_counts(tmp_path):
    import show_rows

    path = tmp_path / "wan.json"
    with pytest.raises(MemoryError):
        with RowLog(path, meta={"device": "NVIDIA H100"}, echo=False) as log:
            log.add(mode="eager", speedup=1.8, fraction_of_ideal=0.98, dense_ms=621.0)
            raise MemoryError
    assert show_rows.describe_rows(path, ["mode", "fraction_of_ideal"]).splitlines() == [
        "wan.json: NVIDIA H100, 1 rows, INCOMPLETE (cut or failed)", "  mode=eager  fraction_of_ideal=0.98"]
    junit = tmp_path / "tests.xml"
    junit.write_text('<testsuites><testsuite tests="5" failures="1" errors="1" skipped="2">'
                     '<testcase classname="tests.backends.test_fa4" name="test_matches"><failure/></testcase>'
                     '<testcase classname="tests.test_ops" name="test_op"><error/></testcase></testsuite></testsuites>')
    assert show_rows.junit_counts(junit).splitlines() == [
        "tests.xml: 1 passed, 1 failed, 1 errors, 2 skipped", "  FAILED tests.backends.test_fa4::test_matches",
        "  FAILED tests.test_ops::test_op"]


def _gpu_attention_inputs():
    generator = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, weight = (torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=generator)
                       for shape in [(1, 8, 4096, 128)] * 3 + [(128, 128)])
    reference = F.scaled_dot_product_attention(q.float(), k.float(), v.float()) @ weight.float()
    return q, k, v, weight, reference


def _check_only_attention_is_counted(function, q, k, v, weight, reference):
    from timing import median_ms

    output = function()
    assert float((output.float() - reference).norm() / reference.norm()) < 2e-2
    sdpa_alone_ms = median_ms(lambda: F.scaled_dot_product_attention(q, k, v), "cuda", repeats=5)
    step_ms = median_ms(function, "cuda", repeats=5)
    measured = attention_time.measure_attention_time(function, "cuda", steps=3)
    assert measured.calls_per_step >= 1, "no attention kernel recognised on this card"
    assert set(measured.by_family) <= {"cudnn", "flash", "efficient"}
    # Only the attention: about SDPA's own time, less than the step with its GEMM.
    assert measured.attention_ms < step_ms
    assert measured.attention_ms == pytest.approx(sdpa_alone_ms, rel=0.5)


@pytest.mark.gpu
@pytest.mark.parametrize("sdpa_backend", ["CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION"])
def test_this_gpus_sdpa_kernels_are_recognised_and_nothing_else(sdpa_backend):
    """On the card: each SDPA backend's kernels are found by name, the projection's GEMM is not."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v, weight, reference = _gpu_attention_inputs()
    with sdpa_kernel(getattr(SDPBackend, sdpa_backend)):
        try:
            F.scaled_dot_product_attention(q, k, v)
        except RuntimeError as error:  # this backend does not run here (card, build)
            pytest.skip(f"SDPA backend {sdpa_backend} unavailable: {error}")
        _check_only_attention_is_counted(lambda: F.scaled_dot_product_attention(q, k, v) @ weight, q, k, v, weight,
                                         reference)


@pytest.mark.gpu
def test_this_gpus_attention_kernels_are_recognised_under_torch_compile():
    """Inductor may name kernels around SDPA after it; only the attention kernel itself counts."""
    q, k, v, weight, reference = _gpu_attention_inputs()
    step = torch.compile(lambda: F.scaled_dot_product_attention(q, k, v) @ weight)
    try:
        _check_only_attention_is_counted(step, q, k, v, weight, reference)
    finally:
        torch._dynamo.reset()
