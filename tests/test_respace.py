"""Respacing (IDDPM sec. 4, eq. 19; DDIM sec. 4.2) against the base process."""

import math
import re

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from diffusion.evaluation import respace_process
from diffusion.process import GaussianDiffusion, SpacedDiffusion, respace, space_timesteps
from diffusion.process.respace import normalize_section_counts
from diffusion.process.schedules import get_named_beta_schedule
from diffusion.sampling import DDIMSampler
from diffusion.sampling.steps import normalize_respacing

F64 = torch.float64
KW = {"model_mean_type": "epsilon", "model_var_type": "learned_range", "loss_type": "rescaled_mse"}


def test_ddim50_keeps_every_20th_step():
    assert space_timesteps(1000, "ddim50") == set(range(0, 1000, 20))
    assert space_timesteps(1000, "ddim1000") == set(range(1000))


def test_impossible_ddim_stride_is_an_error():
    # strides 1..10 of 10 steps give 10, 5, 4, 3, 2, 2, 2, 2, 2, 1 steps: never 7
    with pytest.raises(ValueError, match="exactly 7 steps of 10"):
        space_timesteps(10, "ddim7")
    with pytest.raises(ValueError, match="ddimX"):
        space_timesteps(10, "ddimX")


def reference_space_timesteps(num_timesteps, section_counts):
    """openai/improved-diffusion's respace.space_timesteps for a list of counts, restated:
    per section the stride is ACCUMULATED in floating point and rounded by Python's round."""
    size_per, extra = divmod(num_timesteps, len(section_counts))
    start_idx, all_steps = 0, set()
    for i, section_count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        frac_stride = 1 if section_count <= 1 else (size - 1) / (section_count - 1)
        cur_idx = 0.0
        for _ in range(section_count):
            all_steps.add(start_idx + round(cur_idx))
            cur_idx += frac_stride
        start_idx += size
    return all_steps


def test_sections_are_strided_evenly_with_both_ends():
    # 300 steps, three sections of 100: ends 0/99, 100/199, 200/299, 45 distinct steps
    steps = space_timesteps(300, [10, 15, 20])
    assert steps == reference_space_timesteps(300, [10, 15, 20]) and len(steps) == 45
    assert {0, 99, 100, 199, 200, 299} <= steps
    assert space_timesteps(300, "10,15,20") == steps
    assert space_timesteps(100, 10) == {round(k * 11) for k in range(10)}  # stride 99/9 = 11
    assert space_timesteps(10, [1]) == {0}


SECTION_STRINGS = ["1", "2", "10", "25", "50", "10,15,20", "3,1,4", "100,50"]


def test_section_counts_select_improved_diffusions_steps_for_every_t():
    for text in SECTION_STRINGS:
        counts = [int(c) for c in text.split(",")]
        for num_timesteps in range(2, 4001):
            size_per, extra = divmod(num_timesteps, len(counts))
            sizes = [size_per + (i < extra) for i in range(len(counts))]
            if any(count > size for count, size in zip(counts, sizes, strict=True)):
                with pytest.raises(ValueError, match="cannot divide a section"):
                    space_timesteps(num_timesteps, text)
                continue
            expected = reference_space_timesteps(num_timesteps, counts)
            assert space_timesteps(num_timesteps, text) == expected, (num_timesteps, text)


@pytest.mark.parametrize(
    "num_timesteps, counts, kept, dropped",
    [
        # section 2 (steps 100..199) into 15: 7 strides of 99/14 add up to
        # 49.49999999999999 -> 49, where 7 * 99 / 14 = 49.5 exactly rounds (to even) to 50
        (300, "10,15,20", 149, 150),
        # 29 steps into 25: 21 strides of 28/24 add up to 24.500000000000007 -> 25,
        # where 21 * 28 / 24 = 24.5 exactly rounds (to even) to 24
        (29, "25", 25, 24),
    ],
)
def test_accumulated_stride_differs_from_rounding_each_product(num_timesteps, counts, kept, dropped):
    steps = space_timesteps(num_timesteps, counts)
    assert kept in steps and dropped not in steps
    assert len(steps) == sum(int(c) for c in counts.split(","))


@pytest.mark.parametrize(
    "given, canonical",
    [
        (10, "10"),
        (np.int64(10), "10"),
        ([10, 15, 20], "10,15,20"),
        ((10, np.int64(15)), "10,15"),
        (OmegaConf.create([10, 15, 20]), "10,15,20"),  # sampler.respacing=[10,15,20]
        (" 10, 15 ,20", "10,15,20"),
        ("ddim50", "ddim50"),
    ],
)
def test_one_parser_for_section_counts(given, canonical):
    assert normalize_section_counts(given) == canonical
    assert normalize_respacing(given) == canonical  # the samplers ask the same parser
    assert space_timesteps(300, given) == space_timesteps(300, canonical)


@pytest.mark.parametrize("bad", ["", "10,x", "0,5", "10,-1", [3, -1], [True], 1.5, None])
def test_bad_section_counts_name_the_value_and_the_accepted_forms(bad):
    accepted = r"section counts like '10,15,20' \(positive ints, comma separated\), an int"
    with pytest.raises(ValueError, match=rf"section_counts must be {accepted}.*got {re.escape(repr(bad))}"):
        normalize_section_counts(bad)
    if bad is not None:
        with pytest.raises(ValueError, match=rf"respacing must be {accepted}"):
            normalize_respacing(bad)


def test_uneven_sections_give_the_first_ones_an_extra_step():
    # 10 steps in 3 sections: sizes 4, 3, 3 -> all kept
    assert space_timesteps(10, [4, 3, 3]) == set(range(10))


@pytest.mark.parametrize("counts", [[5, 0], [11], "a,b", 2.5, [True]])
def test_bad_section_counts_are_errors(counts):
    with pytest.raises(ValueError):
        space_timesteps(10, counts)


def test_keeping_every_step_reproduces_the_base_process():
    betas = get_named_beta_schedule("cosine", 50)
    base = GaussianDiffusion(betas=betas, **KW)
    spaced = SpacedDiffusion(range(50), betas=betas, **KW)
    torch.testing.assert_close(
        torch.from_numpy(spaced.betas), torch.from_numpy(betas), rtol=1e-12, atol=1e-15
    )
    for name in [
        "alphas_cumprod",
        "posterior_variance",
        "posterior_log_variance_clipped",
        "posterior_mean_coef1",
    ]:
        torch.testing.assert_close(
            torch.from_numpy(getattr(spaced, name)),
            torch.from_numpy(getattr(base, name)),
            rtol=1e-12,
            atol=1e-15,
        )
    assert spaced.original_num_steps == 50 and spaced.num_timesteps == 50


def test_respaced_alpha_bar_equals_the_original_at_kept_steps():
    betas = get_named_beta_schedule("linear", 1000)
    use = space_timesteps(1000, "ddim50")
    spaced = SpacedDiffusion(use, betas=betas, **KW)
    kept = np.array(sorted(use))
    alpha_bar = np.cumprod(1 - betas)
    assert spaced.timestep_map.dtype == np.int64 and (spaced.timestep_map == kept).all()
    torch.testing.assert_close(
        torch.from_numpy(spaced.alphas_cumprod),
        torch.from_numpy(alpha_bar[kept]),
        rtol=1e-12,
        atol=0,
    )
    assert spaced.num_timesteps == 50 and spaced.original_num_steps == 1000


def test_constructor_does_not_mutate_kwargs_and_validates_steps():
    kwargs = {"betas": get_named_beta_schedule("cosine", 10), **KW}
    SpacedDiffusion({0, 5}, **kwargs)
    assert len(kwargs["betas"]) == 10
    with pytest.raises(ValueError, match="out of range"):
        SpacedDiffusion({0, 10}, **kwargs)
    with pytest.raises(ValueError, match="non-empty"):
        SpacedDiffusion(set(), **kwargs)


def min_snr_v_weights(alpha_bar, gamma):
    """Min-SNR-γ for a v target, min(SNR, γ)/(SNR + 1) (Hang et al. 2023, sec. 3.4)."""
    snr = alpha_bar / (1 - alpha_bar)
    return np.minimum(snr, gamma) / (snr + 1)


RESPACERS = {
    "respace": lambda d: respace(d, range(0, 100, 10)),
    "sampler": lambda d: DDIMSampler(steps=10).respaced(d),  # range(0, 100, 10) too
    "evaluate_bpd": lambda d: respace_process(d, "ddim10"),
}


@pytest.mark.parametrize("how", sorted(RESPACERS))
def test_a_respaced_process_keeps_every_setting(how):
    betas = get_named_beta_schedule("cosine", 100)
    kwargs = dict(model_mean_type="v", model_var_type="learned_range", loss_type="rescaled_mse",
                  rescale_timesteps=True, loss_weighting="min_snr", min_snr_gamma=2.5)
    spaced = RESPACERS[how](GaussianDiffusion(betas=betas, **kwargs))
    assert spaced.timestep_map.tolist() == list(range(0, 100, 10))
    assert {name: getattr(spaced, name) for name in kwargs} == kwargs
    # the weights follow the respaced process's own ᾱ, taken at the kept steps
    alpha_bar = np.cumprod(1 - betas)[::10]
    torch.testing.assert_close(torch.from_numpy(spaced.mse_loss_weights),
                               torch.from_numpy(min_snr_v_weights(alpha_bar, 2.5)),
                               rtol=1e-12, atol=0)


def test_respacing_a_respaced_process_counts_its_own_steps():
    betas = get_named_beta_schedule("linear", 100)
    once = respace(GaussianDiffusion(betas=betas, **KW), range(0, 100, 10))  # 0, 10, ..., 90
    twice = respace(once, [0, 5, 9])  # its steps 0, 5, 9 are the original 0, 50, 90
    direct = respace(GaussianDiffusion(betas=betas, **KW), [0, 50, 90])
    assert twice.timestep_map.tolist() == [0, 50, 90] and twice.original_num_steps == 100
    np.testing.assert_array_equal(twice.betas, direct.betas)
    with pytest.raises(ValueError, match=r"indices in \[0, 10\).*out of range: \[10\]"):
        respace(once, [0, 10])


class Recorder:
    """A model that records the timesteps it receives and predicts zero noise."""

    def __init__(self, channels=2):
        self.seen, self.channels = [], channels

    def __call__(self, x, t, **kwargs):
        self.seen.append(t.clone())
        return torch.zeros(x.shape[0], self.channels * x.shape[1], *x.shape[2:], dtype=x.dtype)


@pytest.mark.parametrize("rescale", [False, True])
def test_model_receives_original_indices(rescale):
    betas = get_named_beta_schedule("linear", 100)
    spaced = SpacedDiffusion(
        space_timesteps(100, "ddim10"), betas=betas, rescale_timesteps=rescale, **KW
    )
    model = Recorder()
    x = torch.zeros(3, 1, 2, 2, dtype=F64)
    t = torch.tensor([0, 4, 9])
    spaced.p_mean_variance(model, x, t)
    spaced.training_losses(model, x, t)
    spaced.ddim_sample_loop(model, (3, 1, 2, 2))
    expected = torch.tensor([0, 40, 90])
    if rescale:
        expected = expected.float() * 1000.0 / 100
    for seen in model.seen[:2]:  # p_mean_variance, training_losses
        torch.testing.assert_close(seen, expected, rtol=0, atol=0)
    loop_ts = [int(s[0]) if not rescale else round(float(s[0]) / 10) for s in model.seen[2:]]
    assert loop_ts == list(range(90, -1, -10))
    torch.testing.assert_close(spaced.model_timesteps(t), expected, rtol=0, atol=0)


def test_ddim_on_a_respaced_process_with_the_oracle_ends_at_x_start():
    betas = get_named_beta_schedule("cosine", 200)
    alpha_bar = np.cumprod(1 - betas)
    spaced = SpacedDiffusion(
        space_timesteps(200, "ddim20"), betas=betas, **{**KW, "model_var_type": "fixed_small"}
    )
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 1, 2, 2, generator=g, dtype=F64) * 2 - 1

    def oracle(x, t):  # ε from ORIGINAL indices t and the base ᾱ
        a = torch.from_numpy(np.sqrt(alpha_bar)[t.numpy()]).view(-1, 1, 1, 1)
        return (x - a * x0) / (1 - a**2).sqrt()

    x_T = math.sqrt(alpha_bar[190]) * x0 + math.sqrt(1 - alpha_bar[190]) * torch.randn(
        x0.shape, generator=g, dtype=F64
    )
    out = spaced.ddim_sample_loop(oracle, x0.shape, noise=x_T)
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-9)
