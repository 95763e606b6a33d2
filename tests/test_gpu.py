"""CUDA checks, skipped without a GPU (tools/gpu_check.sh runs them on one): the golden fixtures on CUDA for
every usable SSM backend, and the mamba-ssm kernels against the torch path (fp32 and bf16, forward and
gradients) for Mamba2 and Mamba1 at the official, small and odd widths."""
import pytest
import torch
from conftest import golden_cases

from advarm import kernels, ssm
from models_adventurer import Adventurer
from models_arm import ARM, VisionMamba

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CLASSES = {"adventurer": Adventurer, "arm_pretrain": VisionMamba, "arm_finetune": ARM}


@pytest.fixture(autouse=True)
def exact_fp32_and_auto_afterwards(monkeypatch):
    """fp32 means fp32 here: no TF32 in cuDNN's patch-embedding conv or in matmuls."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    yield
    kernels.set_backend("auto")


def use(backend, mixer):
    if backend == "mamba_ssm" and kernels.available_backends()[f"mamba_ssm:{mixer}"] is not None:
        pytest.skip(kernels.available_backends()[f"mamba_ssm:{mixer}"])
    kernels.set_backend(backend)


def rel_err(actual, expected):
    return ((actual.float() - expected.float()).norm() / expected.float().norm()).item()


@pytest.mark.parametrize("backend", ["torch", "mamba_ssm"])
@pytest.mark.parametrize("name", golden_cases())
def test_golden_fixture_on_cuda(golden, name, backend):
    case = golden(name)
    use(backend, "Mamba2" if case["family"] == "adventurer" else "Mamba1")
    model = CLASSES[case["family"]](**case["kwargs"]).eval()
    model.load_state_dict(case["state_dict"], strict=True)
    model.cuda()
    images = case["input"].cuda()
    with torch.no_grad():
        out = model(images)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            low = model(images)
    torch.testing.assert_close(out.cpu(), case["output"], rtol=1e-4, atol=1e-4)
    assert rel_err(low.cpu(), case["output"]) < 3e-2  # bf16 noise


def perturbed(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g).to(p.device))
    return module


MIXERS = [("Mamba2", 768, 300), ("Mamba2", 256, 198), ("Mamba2", 96, 70), ("Mamba2", 64, 70),
          ("Mamba1-v3", 768, 197), ("Mamba1-v3", 96, 50), ("Mamba1-v3", 64, 17), ("Mamba1", 64, 130)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mixer, dim, length", MIXERS)
def test_kernels_equal_the_torch_path(mixer, dim, length, dtype):
    """Output and every gradient of the mamba_ssm backend against the torch backend, same weights."""
    use("mamba_ssm", mixer.split("-")[0])
    torch.manual_seed(0)
    module = ssm.Mamba2(dim) if mixer == "Mamba2" else ssm.Mamba1(dim, bimamba_type="v3" if "v3" in mixer else "none")
    module = perturbed(module.cuda())
    u = torch.randn(2, length, dim, device="cuda")
    weight = torch.randn(2, length, dim, device="cuda")
    results = {}
    for backend in ("torch", "mamba_ssm"):
        kernels.set_backend(backend)
        x = u.clone().requires_grad_()
        with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            out = module(x)
        grads = torch.autograd.grad((out.float() * weight).sum(), [x, *module.parameters()])
        results[backend] = (out, grads)
    (out, grads), (ref, ref_grads) = results["mamba_ssm"], results["torch"]
    tol = 2e-3 if dtype == torch.float32 else 3e-2  # fp32: the Triton SSD's dot products run in TF32
    assert rel_err(out, ref) < tol
    names = ["input", *(n for n, _ in module.named_parameters())]
    for name, g, g_ref in zip(names, grads, ref_grads):
        assert rel_err(g, g_ref) < 3 * tol, name
