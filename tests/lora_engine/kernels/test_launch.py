"""kernels/launch.py: the direct-launch key must separate exactly the launches Triton would compile apart."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_engine.kernels import launch

needs_triton = pytest.mark.skipif(launch.triton is None, reason="triton is not importable")


def _triton_specialization(args: tuple) -> tuple:
    """What the installed triton's JITFunction.run specializes each runtime argument on (its binder's call)."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend
    return tuple(native_specialize_impl(BaseBackend, a, False, True, True) for a in args)


INTS = st.one_of(st.sampled_from([0, 1, 2, 3, 8, 15, 16, 17, 32, 1280, 2**31 - 16, 2**31 - 1, 2**31, -2**31, -1]),
                 st.integers(-2**40, 2**40))


@needs_triton
@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([torch.bfloat16, torch.float16, torch.float32]), st.integers(0, 16)),
                min_size=2, max_size=2), st.lists(INTS, min_size=2, max_size=2),
       st.lists(st.floats(-1e3, 1e3), min_size=2, max_size=2))
def test_direct_launch_key_separates_exactly_what_triton_specializes(ptrs, ints, floats):
    """Two calls share a direct-launch entry iff triton would bind them to the same compiled kernel: a coarser key
    would launch a kernel compiled for another alignment or with M == 1 baked in; a finer one recompiles for nothing."""
    buf = torch.zeros(256, dtype=torch.float32)  # 64-byte aligned; element offsets move the pointer's alignment
    a, b = (buf.to(dtype)[offset:] for dtype, offset in ptrs)
    calls = ((a, ints[0], floats[0]), (b, ints[1], floats[1]))
    ours = [launch.specialization(c) for c in calls]
    theirs = [_triton_specialization(c) for c in calls]
    assert (ours[0] == ours[1]) == (theirs[0] == theirs[1]), (ptrs, ints, floats, ours, theirs)


def test_direct_launch_key_of_a_decode_call():
    W, x = torch.zeros(1280, 3840, dtype=torch.bfloat16), torch.zeros(8, 1280)
    key = lambda x, M, K=1280: launch.specialization((x, W, M, K, 3840, 8))  # noqa: E731
    assert key(x, 2) == key(x, 8)  # 2..8 rows: one kernel, launched directly
    assert key(x, 1) != key(x, 2)  # M == 1 is a constexpr to triton
    assert key(x, 2, K=1280) != key(x, 2, K=1288)  # K % 16
    assert key(x[:, 1:], 2) != key(x, 2) and key(x[:, 4:], 2) == key(x, 2)  # 4 bytes off; 16 bytes off
    assert key(x.bfloat16(), 2) != key(x, 2)


def test_launch_arguments_keep_every_tensor_not_on_the_launch_device():
    """`specialized` hands Triton an address only for a tensor on the launching CUDA device (where the launcher's
    cuPointerGetAttribute would accept it); a CPU tensor stays a tensor so Triton still refuses it, and every other
    argument passes unchanged. The key is specialization's either way."""
    x, W = torch.zeros(8, 1280), torch.zeros(4, dtype=torch.bfloat16)
    args = (x, W, 7, 1, 2.5, True)
    spec, raw = launch.specialized(args, 0)
    assert spec == launch.specialization(args)
    assert raw[0] is x and raw[1] is W and raw[2:] == (7, 1, 2.5, True)
    if torch.cuda.is_available():
        g = torch.zeros(16, device="cuda")
        _, raw = launch.specialized((g, x), torch.cuda.current_device())
        assert raw[0] == g.data_ptr() and type(raw[0]) is int and raw[1] is x


def test_constexpr_flags_passed_by_position_are_part_of_the_key():
    """lora_train_triton passes HAS_BIAS by position: two launches that differ only there must not share a kernel."""
    x = torch.zeros(4)
    assert launch.specialization((x, True)) != launch.specialization((x, False))
    assert launch.specialization((x, 1.5)) == launch.specialization((x, -3.0))  # floats: always fp32


class _FakeCompiled:
    function, packed_metadata = "function", "packed_metadata"

    def __init__(self, log):
        self.log = log

    def run(self, *args):
        self.log.append("direct")


class _FakeJIT:
    arg_names = ("x", "BLOCK")
    pre_run_hooks: list = []

    def __init__(self, log):
        self.log = log

    def __getitem__(self, grid):
        def launch(*args, **kw):
            self.log.append("jit")
            return _FakeCompiled(self.log)
        return launch


@needs_triton
def test_two_configurations_under_one_key_do_not_evict_each_other(monkeypatch):
    """Two layers with the same launch key but their own tiles (kw objects): each compiles once, then both launch
    directly, however their calls interleave."""
    log = []
    launcher = launch.DirectLauncher(_FakeJIT(log), "fake")
    launcher.direct = True
    monkeypatch.setattr(launch, "_current_device", lambda: 0)
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda device: 7, raising=False)
    kw_a, kw_b = {"BLOCK": 16}, {"BLOCK": 32}
    x = torch.zeros(8)
    for _ in range(3):
        launcher((1,), (x,), kw_a, "key")
        launcher((1,), (x,), kw_b, "key")
    assert log == ["jit", "jit"] + ["direct"] * 4
    assert launcher.launches == {"direct": 4, "jit": 2}  # what benchmarks/host_train.py reports
    launcher((1,), (x,), {"BLOCK": 16}, "key")  # an equal but new object: compiled again, as after set_config
    assert log[-1] == "jit" and launcher.launches == {"direct": 4, "jit": 3}


class _FakeCudaLauncher:
    """Stands for triton 3.6's CudaLauncher: `launch` is its C launch, __call__ what run() adds in Python."""

    def __init__(self, log, scratch=0):
        self.log, self.global_scratch_size, self.profile_scratch_size = log, scratch, 0
        self.launch_cooperative_grid, self.launch_pdl = False, True

    def launch(self, *args):
        self.log.append(("c", args))

    def __call__(self, *args):
        self.log.append(("run", args))


@needs_triton
@pytest.mark.parametrize("version, scratch, via", [("3.6.0", 0, "c"), ("3.6.0", 64, "run"), ("3.9.0", 0, "run")])
def test_direct_launch_calls_the_c_launcher_only_where_run_adds_nothing(monkeypatch, version, scratch, via):
    """triton 3.6 and no scratch: the C launch itself, with run()'s own arguments (cooperative, pdl, two None
    scratches) in run()'s order; a kernel with scratch or another triton: run(), which allocates it."""
    log = []
    compiled = _FakeCompiled(log)
    compiled.run = _FakeCudaLauncher(log, scratch)

    class JIT(_FakeJIT):
        def __getitem__(self, grid):
            return lambda *args, **kw: (log.append("jit"), compiled)[1]

    monkeypatch.setattr(launch.triton, "__version__", version)
    monkeypatch.setattr(launch, "_current_device", lambda: 0)
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda device: 7, raising=False)
    launcher = launch.DirectLauncher(JIT(log), "fake")
    launcher.direct = True
    kw, x = {"BLOCK": 16}, torch.zeros(8)
    launcher((3,), (x,), kw, "key")
    launcher((3,), (x,), kw, "key")
    assert log[0] == "jit" and log[1][0] == via
    tail = (x, 16)  # a CPU tensor stays a tensor; then the constexprs
    if via == "c":
        assert log[1][1] == (3, 1, 1, 7, "function", False, True, None, None, "packed_metadata", None, None, None,
                             *tail)
    else:
        assert log[1][1] == (3, 1, 1, 7, "function", "packed_metadata", None, None, None, *tail)


needs_descriptors = pytest.mark.skipif(launch.TensorDescriptor is None,
                                       reason="this triton has no host tensor descriptors")


@needs_triton
@needs_descriptors
def test_tiled_key_separates_exactly_what_triton_specializes_a_descriptor_on():
    """A descriptor is specialized on its dtype and block (its type, "tensordesc<bf16[128, 64]>"), not its address,
    shape or strides (runtime arguments)."""
    buf = torch.zeros(64, 128, dtype=torch.bfloat16)
    cases = [launch.Tiled(buf, (64, 128), (128, 1), (16, 32)), launch.Tiled(buf[8:], (56, 128), (128, 1), (16, 32)),
             launch.Tiled(buf, (64, 64), (128, 1), (16, 32)), launch.Tiled(buf, (64, 128), (128, 1), (32, 32)),
             launch.Tiled(buf.half(), (64, 128), (128, 1), (16, 32))]
    ours = [launch.specialization((t,)) for t in cases]
    theirs = [_triton_specialization((t.descriptor(),)) for t in cases]
    for i in range(len(cases)):
        for j in range(len(cases)):
            assert (ours[i] == ours[j]) == (theirs[i] == theirs[j]), (cases[i], cases[j], theirs[i], theirs[j])
    assert ours[0] == ours[1] == ours[2] and ours[0] != ours[3] and ours[0] != ours[4]


def test_tma_alignment_is_what_a_tensor_descriptor_asks():
    buf = torch.zeros(64, 72, dtype=torch.bfloat16)
    assert launch.tma_aligned(buf, (72, 1)) and launch.tma_aligned(buf[8:], (72, 1))  # 144-byte rows
    assert not launch.tma_aligned(buf[:, 1:], (72, 1))  # 2 bytes off
    assert not launch.tma_aligned(buf.view(-1)[:64 * 36].view(64, 36), (36, 1))  # 72-byte rows
    assert not launch.tma_aligned(buf, (1, 72))  # no unit inner stride


class _TMAKernel(_FakeCompiled):
    """A compiled kernel with one descriptor parameter under triton 3.6: run.launch is wrap_handle_tensordesc's
    Python, which closes over the C launch (`launcher`)."""

    def __init__(self, log):
        super().__init__(log)
        self.metadata = type("Metadata", (), {"tensordesc_meta": [{"swizzle": 3}]})()
        self.run = _FakeCudaLauncher(log)

        def launcher(*args):
            log.append(("c", args))

        def inner(*args):  # what 3.6 wraps the C launch in: a CUtensorMap per descriptor, every launch
            log.append(("wrapper", args))
            return launcher(*args)

        self.run.launch = inner


@needs_triton
@needs_descriptors
def test_direct_launch_of_a_tma_kernel_encodes_each_tensor_map_once(monkeypatch):
    """triton 3.6, a Tiled argument: JIT gets the TensorDescriptor; direct launches call the C launch under 3.6's
    wrapper with (CUtensorMap, *shape, *strides) in the descriptor's place, encoded once per address, shape and
    strides with the kernel's own metadata, and again when any of them changes."""
    log, encoded = [], []
    compiled = _TMAKernel(log)

    class JIT(_FakeJIT):
        arg_names = ("a", "n", "BLOCK")

        def __getitem__(self, grid):
            return lambda *args, **kw: (log.append(("jit", args)), compiled)[1]

    def encode(desc, meta):
        encoded.append((desc.base.data_ptr(), tuple(desc.shape), meta))
        return [f"map{len(encoded)}", *desc.shape, *desc.strides]

    monkeypatch.setattr(launch.triton, "__version__", "3.6.0")
    monkeypatch.setattr(launch, "_current_device", lambda: 0)
    monkeypatch.setattr(launch, "_encoder", lambda: encode)
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda device: 7, raising=False)
    launcher = launch.DirectLauncher(JIT(log), "fake")
    launcher.direct = True
    buf, kw = torch.zeros(64, 128, dtype=torch.bfloat16), {"BLOCK": 16}
    t = launch.Tiled(buf, (64, 128), (128, 1), (16, 32))
    for _ in range(3):
        launcher((2,), (t, 5), kw, "key")
    launcher((2,), (launch.Tiled(buf, (32, 128), (128, 1), (16, 32)), 5), kw, "key")  # fewer rows: a new map
    assert log[0][0] == "jit" and isinstance(log[0][1][0], launch.TensorDescriptor) and log[0][1][1] == 5
    head = (2, 1, 1, 7, "function", False, True, None, None, "packed_metadata", None, None, None)
    assert log[1:] == [("c", (*head, "map1", 64, 128, 128, 1, 5, 16))] * 2 + [
        ("c", (*head, "map2", 32, 128, 128, 1, 5, 16))]  # never through the wrapper
    assert encoded == [(buf.data_ptr(), (64, 128), {"swizzle": 3}), (buf.data_ptr(), (32, 128), {"swizzle": 3})]
