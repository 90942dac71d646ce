"""GGML block numerics against llama.cpp: bytes for the 32-element types, error for K-quants."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants

from qtool.errors import BadArgument
from qtool.kernels.cpu import cpu_kernel
from qtool.schemes.base import all_schemes, get_scheme, scheme_names
from qtool.schemes.ggml import GGMLType, ggml_type

from tests._ggml_helpers import llamacpp_quantize

GGML_TYPE_NAMES = scheme_names("gguf")
# The types whose record names a C kernel (qtool/kernels/cpu_ggml.c).
CPU_KERNELS = [name for name in GGML_TYPE_NAMES if get_scheme(name).c_kernel]
LEGACY = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")
KQUANTS = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")


def _edge_case_matrix(n_per_row: int = 256) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1234)
    rows = [torch.randn(n_per_row, generator=generator) * 0.02 for _ in range(6)]
    rows.append(torch.zeros(n_per_row))                                       # all-zero blocks
    rows.append(torch.full((n_per_row,), -0.5))                              # constant blocks
    ties = torch.tensor([(i % 17 - 8) / 8 for i in range(n_per_row)])         # exact .5 after scaling
    rows.append(ties)
    rows.append(torch.randn(n_per_row, generator=generator) * 1e4)           # large: fp16 scale near its max
    rows.append(torch.randn(n_per_row, generator=generator) * 1e-6)          # tiny: subnormal fp16 scales
    spiky = torch.randn(n_per_row, generator=generator) * 0.01
    spiky[::37] = 5.0
    rows.append(spiky)                                                        # outliers
    rows.append(-torch.rand(n_per_row, generator=generator))                 # all negative
    rows.append(torch.rand(n_per_row, generator=generator))                  # all positive
    mixed = torch.randn(n_per_row, generator=generator)
    mixed[:32] = 0
    mixed[32:64] = 7.0
    rows.append(mixed)
    return torch.stack(rows)


def test_registry_has_every_gguf_type_in_the_gguf_family():
    schemes = all_schemes()
    for name in GGML_TYPE_NAMES:
        assert schemes[name].family == "gguf"
        assert isinstance(get_scheme(name), GGMLType)
    assert get_scheme("Q4_K").bits == 4.5
    assert get_scheme("Q6_K").bits == 6.5625
    with pytest.raises(BadArgument):
        ggml_type("Q7_0")


@pytest.mark.parametrize("name", LEGACY)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_legacy_types_equal_llamacpp_reference_bytes(name, dtype):
    weight = torch.cat([_edge_case_matrix(), torch.randn(48, 256, generator=torch.Generator().manual_seed(7))])
    weight = weight.to(dtype)
    packed = ggml_type(name).quantize(weight)
    reference = quants.quantize(weight.float().numpy(), GGMLQuantizationType[name])
    np.testing.assert_array_equal(packed.data.numpy(), reference)
    # gguf.quants is itself checked against C; check against llama.cpp's own bytes too where we can.
    np.testing.assert_array_equal(packed.data.numpy(), llamacpp_quantize(weight.float().numpy(), name))
    # Our decoder agrees with gguf-py's.
    np.testing.assert_allclose(ggml_type(name).dequantize(packed).numpy(),
                               quants.dequantize(reference, GGMLQuantizationType[name]), rtol=0, atol=0)


def test_mxfp4_equals_llamacpp_reference_bytes(smollm2_gguf):
    """MXFP4 (gpt-oss' experts): edge cases (zeros, ties, outliers, blocks below 2^-125 whose exponent wraps
    as C's float -> uint8 conversion does) and real SmolLM2 rows, bytes against libggml, values against gguf-py."""
    from qtool.sources.resolve import resolve

    with resolve(str(smollm2_gguf)) as source:
        real = source.load("model.layers.5.mlp.down_proj.weight")[:64].float()
    ties = (torch.randint(-24, 25, (16, 256), generator=torch.Generator().manual_seed(3)) / 4).float()
    tiny = torch.randn(8, 256, generator=torch.Generator().manual_seed(4)) * torch.tensor(1e-39)
    for weight in (_edge_case_matrix(), ties, tiny, real):
        packed = ggml_type("MXFP4").quantize(weight)
        np.testing.assert_array_equal(packed.data.numpy(), llamacpp_quantize(weight.numpy(), "MXFP4"))
        np.testing.assert_array_equal(ggml_type("MXFP4").dequantize(packed).numpy(),
                                      quants.dequantize(packed.data.numpy(), GGMLQuantizationType.MXFP4))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_iq4_nl_equals_llamacpp_bytes(dtype):
    """IQ4_NL's scale search (first guess, then 15 tried inverse scales, each with its least-squares
    scale) gives llama.cpp's bytes; gguf-py decodes them as our dequantize does."""
    heavy = torch.distributions.StudentT(3.0).sample((64, 256)) * 0.01
    weight = torch.cat([_edge_case_matrix(), torch.randn(64, 256, generator=torch.Generator().manual_seed(3)),
                        heavy]).to(dtype)
    packed = ggml_type("IQ4_NL").quantize(weight)
    np.testing.assert_array_equal(packed.data.numpy(), llamacpp_quantize(weight.float().numpy(), "IQ4_NL"))
    np.testing.assert_array_equal(ggml_type("IQ4_NL").dequantize(packed).numpy(),
                                  quants.dequantize(packed.data.numpy(), GGMLQuantizationType.IQ4_NL))


def _importance_vectors(n_per_row: int) -> list[torch.Tensor]:
    """Importance matrices as llama-imatrix writes them (mean squares: skewed, positive), and the edge
    cases: zero importance over whole blocks and single columns, a huge column, all equal."""
    generator = torch.Generator().manual_seed(11)
    skewed = torch.rand(n_per_row, generator=generator) ** 4 * 10
    holes = skewed.clone()
    holes[:32] = 0          # a whole block weighs nothing: llama.cpp's scale 0 (no 0/0)
    holes[40:43] = 0
    holes[100] = 1e6
    return [skewed, holes, torch.ones(n_per_row)]


@pytest.mark.parametrize("name", ["IQ4_NL", "IQ4_XS"])
def test_iq4_with_importance_equals_llamacpp_bytes(name, smollm2_gguf):
    """IQ4_NL and IQ4_XS (super-blocks of 256: 6-bit sub-block scales under one fp16 scale), without and
    with an importance matrix (llama-quantize --imatrix's quant_weights, imatrix * sqrt(sigma2 + x^2)): the
    bytes libggml writes, on edge cases and real SmolLM2 rows, in every input dtype; gguf-py decodes them
    as our dequantize does."""
    from qtool.sources.resolve import resolve

    with resolve(str(smollm2_gguf)) as source:
        real = source.load("model.layers.3.mlp.down_proj.weight")[:48, :512].float()
    edge = torch.cat([_edge_case_matrix(512), torch.randn(16, 512, generator=torch.Generator().manual_seed(5)) * 3])
    scheme = ggml_type(name)
    for weight in (edge, real, edge.to(torch.bfloat16), real.to(torch.float16)):
        for importance in [None, *_importance_vectors(512)]:
            _assert_libggml_bytes(scheme, weight, importance)


@pytest.mark.parametrize("name", [*KQUANTS, "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_weighted_quantizers_equal_llamacpp_bytes(name, smollm2_gguf):
    """With an importance matrix every K-quant is llama.cpp's weighted quantizer (quantize_row_qX_K_impl:
    make_qkx3_quants / make_qx_quants per sub-block, make_qp_quants for the scale codes), and so are the
    32-element types (quantize_row_q{4,5}_{0,1}_impl, weighted by the whole row's mean square): libggml's
    bytes on edge cases, real SmolLM2 rows and outliers, in every input dtype, so a mix quantized with
    llama.cpp's imatrix (its Q4_0 / Q5_0 fallbacks included) is its file tensor for tensor."""
    from qtool.sources.resolve import resolve

    with resolve(str(smollm2_gguf)) as source:
        real = source.load("model.layers.3.mlp.down_proj.weight")[:24, :512].float()
    edge = torch.cat([_edge_case_matrix(512), torch.randn(8, 512, generator=torch.Generator().manual_seed(5)) * 3])
    scheme = ggml_type(name)
    for weight in (edge, real.bfloat16(), real.to(torch.float16)):
        for importance in _importance_vectors(512):
            _assert_libggml_bytes(scheme, weight, importance)


def _assert_libggml_bytes(scheme: GGMLType, weight: torch.Tensor, importance: torch.Tensor | None) -> None:
    """qtool's bytes are libggml's for this weight and importance, and gguf-py decodes them as we do."""
    packed = scheme.quantize(weight, importance=importance)
    expected = llamacpp_quantize(weight.float().numpy(), scheme.name, None if importance is None else importance.numpy())
    np.testing.assert_array_equal(packed.data.numpy(), expected)
    np.testing.assert_array_equal(scheme.dequantize(packed).numpy(),
                                  quants.dequantize(expected, GGMLQuantizationType[scheme.name]))


LATTICE_IQUANTS = ["IQ3_S", "IQ3_XXS", "IQ2_S", "IQ2_XS", "IQ2_XXS", "IQ1_S", "IQ1_M"]


@pytest.mark.parametrize("name", LATTICE_IQUANTS)
def test_lattice_iquants_equal_llamacpp_bytes(name, smollm2_gguf):
    """The grid i-quants (groups snapped to llama.cpp's grids through its neighbour lists, its scale
    searches, IQ2_XXS's make_qp_quants start, even-parity signs, IQ3_S's skipped empty sub-blocks, the
    IQ1 types' exhaustive split search over sorted values with ties and IQ1_M's super-block refit) give
    libggml's bytes with every importance matrix (and without one where the type allows it), on edge
    cases, sub-blocks below the empty threshold and real SmolLM2 rows; gguf-py decodes them as we do."""
    from qtool.sources.resolve import resolve

    with resolve(str(smollm2_gguf)) as source:
        real = source.load("model.layers.3.mlp.down_proj.weight")[:12, :512].float()
    tiny = torch.randn(2, 512, generator=torch.Generator().manual_seed(8)) * 1e-9
    tiny[:, 100:] = 0.3
    scheme = ggml_type(name)
    cases = [None, *_importance_vectors(512)] if not scheme.requires_importance else _importance_vectors(512)
    for weight in (_edge_case_matrix(512), real.bfloat16(), tiny):
        for importance in cases:
            _assert_libggml_bytes(scheme, weight, importance)
    if scheme.requires_importance:
        with pytest.raises(BadArgument, match=f"{name} needs an importance matrix"):
            scheme.quantize(real)


@pytest.mark.parametrize("name", LATTICE_IQUANTS)
def test_lattice_iquants_torch_code_equals_the_c_kernel(name, monkeypatch):
    """The C search (cpu_ggml.c's lattice_fit / quantize_iq1, what the CPU runs) and the torch code (any
    device) give the same bytes: the test above checks the C path against libggml, this one the torch path."""
    from qtool.kernels import cpu

    def torch_code():     # no C library: the torch code runs
        monkeypatch.setattr(cpu, "lattice_fit", lambda *args: None)
        monkeypatch.setattr(cpu, "ternary_quantize", lambda *args: None)

    scheme = ggml_type(name)
    weight = torch.cat([_edge_case_matrix(512), torch.randn(8, 512, generator=torch.Generator().manual_seed(9))])
    importance = _importance_vectors(512)[1]
    fast = scheme.quantize(weight, importance=importance).data
    torch_code()
    assert torch.equal(scheme.quantize(weight, importance=importance).data, fast)
    if not scheme.requires_importance:
        monkeypatch.undo()
        fast = scheme.quantize(weight).data
        torch_code()
        assert torch.equal(scheme.quantize(weight).data, fast)


def test_importance_is_refused_where_it_cannot_apply():
    """An importance matrix of the wrong length, or for a type whose quantizer does not weigh elements,
    is a clear BadArgument, not a silent round to nearest."""
    weight = torch.randn(4, 256)
    with pytest.raises(BadArgument, match="importance matrix has 128 values for a tensor of 256 columns"):
        ggml_type("IQ4_XS").quantize(weight, importance=torch.ones(128))
    with pytest.raises(BadArgument, match="Q8_0 does not use an importance matrix"):
        ggml_type("Q8_0").quantize(weight, importance=torch.ones(256))


def test_cpu_kernels_are_built_here():
    """CI has a C compiler: the fast path must really be the one the other tests exercise."""
    missing = [name for name in CPU_KERNELS if cpu_kernel(get_scheme(name)) is None]
    assert not missing, f"no C kernel for {missing} (compiler: {shutil.which('cc') or shutil.which('gcc')})"


@pytest.mark.parametrize("name", list(CPU_KERNELS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cpu_kernel_bytes_equal_the_torch_reference(name, dtype):
    """The C kernel against the scheme's torch code, on the edge cases and on model-like weights
    (several chunks, so the threaded split is covered too)."""
    from qtool.schemes import _parallel

    scheme = ggml_type(name)
    generator = torch.Generator().manual_seed(11)
    # Subnormal rows (1 / span overflows in the K-quant search); float16 would turn them into mixed
    # signed zeros, whose minimum's sign is not defined by torch's reductions.
    subnormal = torch.randn(4 if dtype != torch.float16 else 0, 1024, generator=generator) * 1e-39
    weight = torch.cat([_edge_case_matrix(1024), subnormal, torch.randn(1100, 1024, generator=generator) * 0.02])
    weight = weight.to(dtype)
    blocks = weight.reshape(-1, scheme.block_size)
    kernel = cpu_kernel(get_scheme(name))
    reference = scheme._quantize_chunks(blocks)
    chunk = _parallel.CPU_CHUNK_ELEMENTS
    try:
        _parallel.CPU_CHUNK_ELEMENTS = 1 << 16
        fast = kernel(blocks)
    finally:
        _parallel.CPU_CHUNK_ELEMENTS = chunk
    mismatched = (fast != reference).any(dim=-1).nonzero().flatten().tolist()
    assert not mismatched, f"{name} {dtype}: {len(mismatched)} blocks differ, first {mismatched[:5]}"
    if scheme.takes_importance:   # with an importance matrix: one value per column, chunks mid-row
        head = blocks[:160 * 1024 // scheme.block_size]     # the edge cases and some random rows
        for importance in _importance_vectors(1024):
            reference = scheme._quantize_chunks(head, scheme._importance_blocks(importance, (160, 1024)))
            try:
                _parallel.CPU_CHUNK_ELEMENTS = 3 << 14
                fast = kernel(head, importance)
            finally:
                _parallel.CPU_CHUNK_ELEMENTS = chunk
            assert torch.equal(fast, reference), f"{name} {dtype} with an importance matrix"


@pytest.mark.parametrize("name", KQUANTS)
def test_kquant_bytes_decode_with_gguf_py_as_our_dequantize(name):
    weight = _edge_case_matrix()
    packed = ggml_type(name).quantize(weight)
    assert packed.data.shape == (weight.shape[0], ggml_type(name).type_size)
    reference_decode = quants.dequantize(packed.data.numpy(), GGMLQuantizationType[name])
    np.testing.assert_allclose(ggml_type(name).dequantize(packed).numpy(), reference_decode, rtol=1e-6, atol=1e-30)
    assert np.isfinite(reference_decode).all()
    assert not reference_decode[6].any()   # all-zero row stays zero


def _weights_like_models() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(99)
    gaussian = torch.randn(128, 1024, generator=generator) * 0.02
    heavy = torch.distributions.StudentT(3.0).sample((128, 1024)) * 0.01
    row_scaled = torch.randn(128, 1024, generator=generator) * torch.rand(128, 1, generator=generator) * 0.1
    return {"gaussian": gaussian, "student-t": heavy, "row-scaled": row_scaled}


@pytest.mark.parametrize("name", KQUANTS)
def test_kquant_error_is_no_worse_than_llamacpp(name):
    """RMSE of gguf.quants.dequantize(our bytes) vs the original <= that of llama.cpp's bytes."""
    torch.manual_seed(5)
    for label, weight in _weights_like_models().items():
        ours = quants.dequantize(ggml_type(name).quantize(weight).data.numpy(), GGMLQuantizationType[name])
        theirs = quants.dequantize(llamacpp_quantize(weight.numpy(), name), GGMLQuantizationType[name])
        ours_rmse = float(np.sqrt(np.mean((ours - weight.numpy()) ** 2)))
        theirs_rmse = float(np.sqrt(np.mean((theirs - weight.numpy()) ** 2)))
        assert ours_rmse <= theirs_rmse, f"{name} on {label}: qtool {ours_rmse:.6g} > llama.cpp {theirs_rmse:.6g}"


@pytest.mark.parametrize("name", ["F32", "F16", "BF16"])
def test_float_types_match_gguf_py(name):
    weight = torch.randn(8, 64) * 100
    packed = ggml_type(name).quantize(weight)
    if name == "BF16":
        expected = quants.quantize(weight.numpy(), GGMLQuantizationType.BF16)
    else:
        expected = quants.quantize(weight.numpy(), GGMLQuantizationType[name]).view(np.uint8)
    np.testing.assert_array_equal(packed.data.numpy().reshape(-1), expected.reshape(-1))


def test_shape_and_dtype_errors_name_the_type():
    with pytest.raises(BadArgument, match="Q4_K needs rows that are a multiple of 256"):
        ggml_type("Q4_K").quantize(torch.zeros(4, 576))
    with pytest.raises(BadArgument, match="floating-point"):
        ggml_type("Q8_0").quantize(torch.zeros(4, 64, dtype=torch.int32))


def test_three_dimensional_tensors_are_rows_of_the_last_dimension():
    weight = torch.randn(2, 3, 64)
    packed = ggml_type("Q8_0").quantize(weight)
    assert packed.shape == (2, 3, 64)
    assert ggml_type("Q8_0").dequantize(packed).shape == (2, 3, 64)


def test_cpu_kernels_give_the_same_bytes_without_vector_instructions(tmp_path):
    """The shipped build has an AVX2 clone of every kernel picked at run time; a plain x86-64 (or
    other) build must give the same bytes, or files would depend on the machine."""
    from qtool.kernels import cpu

    portable = cpu.build_library(tmp_path, ("-DQTOOL_PORTABLE", "-O1", "-fno-tree-vectorize"))
    generator = torch.Generator().manual_seed(5)
    weight = torch.cat([_edge_case_matrix(512), torch.randn(300, 512, generator=generator) * 0.02]).bfloat16()
    for name in CPU_KERNELS:
        blocks = weight.reshape(-1, ggml_type(name).block_size)
        scheme = get_scheme(name)
        assert torch.equal(cpu_kernel(scheme)(blocks), cpu_kernel(scheme, portable)(blocks)), name
        if scheme.takes_importance:
            importance = _importance_vectors(512)[1]
            assert torch.equal(cpu_kernel(scheme)(blocks, importance), cpu_kernel(scheme, portable)(blocks, importance)), \
                f"{name} with an importance matrix"
