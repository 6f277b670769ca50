"""The process's tensor plumbing (process/_tensor.py): noise, the model's placement, and the
timesteps a model sees; each written once and used by the process, samplers and evaluation."""

import pytest
import torch
from torch import nn

from diffusion.process._tensor import (
    model_device,
    model_dtype,
    randn,
    randn_like,
    scale_timesteps,
    unscale_timesteps,
)


def test_randn_draws_from_the_generator_in_the_asked_dtype():
    expected = torch.randn(2, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    got = randn((2, 3), torch.Generator().manual_seed(0), dtype=torch.float64)
    assert got.device.type == "cpu"
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    like = randn_like(torch.zeros(2, 3, dtype=torch.float64), torch.Generator().manual_seed(0))
    torch.testing.assert_close(like, expected, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cpu_generator_gives_the_same_noise_on_cuda():
    on_cpu = randn((4, 5), torch.Generator().manual_seed(1))
    on_cuda = randn_like(torch.zeros(4, 5, device="cuda"), torch.Generator().manual_seed(1))
    assert on_cuda.device.type == "cuda"
    torch.testing.assert_close(on_cuda.cpu(), on_cpu, rtol=0, atol=0)


class Buffers(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("index", torch.zeros(3, dtype=torch.int64))
        self.register_buffer("scale", torch.ones(3, dtype=torch.float64))


def test_the_models_placement_is_that_of_its_tensors():
    net = nn.Linear(2, 2).double()
    assert model_device(net) == torch.device("cpu") and model_dtype(net) == torch.float64
    assert model_dtype(Buffers()) == torch.float64  # the first FLOATING tensor, a buffer here
    # a closure hides its network's tensors, and a Module may have none: only the caller knows
    for hidden in (lambda x, t: net(x), nn.Identity()):
        assert model_device(hidden) is None and model_dtype(hidden) is None


@pytest.mark.parametrize("num_timesteps", [1000, 4000, 300])
def test_rescaled_timesteps_are_t_times_1000_over_t(num_timesteps):
    t = torch.tensor([0, 1, num_timesteps // 2, num_timesteps - 1])
    assert scale_timesteps(t, num_timesteps, False) is t  # indices pass through untouched
    scaled = scale_timesteps(t, num_timesteps, True)
    assert scaled.dtype == torch.float32
    expected = torch.tensor([i * 1000 / num_timesteps for i in t.tolist()], dtype=torch.float32)
    torch.testing.assert_close(scaled, expected, rtol=2e-7, atol=0)
    # the inverse returns float64 indices, within float32's rounding of the forward map
    torch.testing.assert_close(unscale_timesteps(scaled, num_timesteps, True), t.double(),
                               rtol=1e-6, atol=1e-9)
    assert unscale_timesteps(t, num_timesteps, False).dtype == torch.float64
