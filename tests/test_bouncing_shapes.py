"""The procedural bouncing-shapes videos and the flow-matching helpers the trained teacher uses."""
import torch

from rehyat_compile.bouncing_shapes import bounce, bouncing_shapes, sample_shape_params, shape_centres
from rehyat_compile.flow_matching import (euler_sample, noisy, sample_times, validation_batches,
                                          velocity_target)


def test_same_seed_gives_the_same_videos_and_another_seed_others():
    a, b, c = bouncing_shapes(4, 3), bouncing_shapes(4, 3), bouncing_shapes(4, 4)
    assert a.shape == (4, 3, 8, 16, 16)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= -1 and a.max() <= 1


def test_bounce_stays_between_the_walls_and_reflects_the_velocity():
    low, high = torch.tensor(2.0), torch.tensor(10.0)
    free = torch.linspace(-40, 40, 2001)
    pos = bounce(free, low, high)
    assert pos.min() >= low - 1e-5 and pos.max() <= high + 1e-5
    step = pos.diff().abs()
    assert step.max() <= (free[1] - free[0]) + 1e-5          # continuous: never jumps
    assert torch.allclose(bounce(torch.tensor(12.0), low, high), torch.tensor(8.0))  # 2 past the wall -> 2 back


def test_shapes_move_at_constant_speed_inside_the_frame():
    params = sample_shape_params(8, 0)
    centres = shape_centres(params, frames=8)                 # [n, S, F, 2]
    r = params["radius"][:, :, None, None]
    assert (centres >= r - 1e-4).all() and (centres <= 16 - r + 1e-4).all()
    speed = centres.diff(dim=2).abs()                          # per axis, |v| except where it bounced
    assert torch.isclose(speed, params["velocity"].abs()[:, :, None, :], atol=1e-4).float().mean() > 0.6
    video = bouncing_shapes(8, 0)
    assert (video[:, :, 1:] - video[:, :, :-1]).abs().amax(dim=(1, 3, 4)).min() > 0.1  # every frame changes


def test_noisy_interpolates_from_data_to_noise():
    x0, noise = torch.randn(3, 2, 4), torch.randn(3, 2, 4)
    assert torch.equal(noisy(x0, noise, torch.zeros(3)), x0)
    assert torch.equal(noisy(x0, noise, torch.ones(3)), noise)
    assert torch.allclose(noise - x0, velocity_target(x0, noise))


def test_euler_with_the_exact_velocity_of_one_point_recovers_it():
    x0 = torch.randn(2, 3, 4)

    def exact(x, s):  # the flow of a point mass at x0: v = (x - x0) / s
        return (x - x0) / s.view(-1, 1, 1)
    out = euler_sample(exact, torch.randn(2, 3, 4), steps=10, shift=3.0)
    assert torch.allclose(out, x0, atol=1e-5)
    times = sample_times(10, shift=3.0)
    assert times[0] == 1 and times[-1] == 0 and (times.diff() < 0).all()


def test_validation_batches_are_fixed_by_their_seed():
    videos = bouncing_shapes(6, 1)
    a, b = validation_batches(videos, 5, 4), validation_batches(videos, 5, 4)
    assert [x[0].shape[0] for x in a] == [4, 2]
    assert all(torch.equal(u, v) for p, q in zip(a, b) for u, v in zip(p, q))
    times = torch.cat([x[2] for x in a])
    assert (times > 0).all() and (times < 1).all()
