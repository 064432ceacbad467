"""Parity of vitserve.preprocess with the Hugging Face Qwen3-VL image and video processors."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("torchvision")
transformers = pytest.importorskip("transformers")
from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor  # noqa: E402

import vitserve.preprocess.api as preprocess_api  # noqa: E402
from vitserve.preprocess import (  # noqa: E402
    PreprocessConfig,
    preprocess_batch,
    preprocess_image,
    preprocess_video,
)
from vitserve.preprocess.resize import resize_uint8_native, resize_uint8_portable  # noqa: E402

# One uint8 step after (x / 255 - 0.5) / 0.5, plus float32 slack.
ROUNDING = 2 / 255 + 1e-6

# The released Qwen3-VL checkpoint's preprocessor_config.json / video_preprocessor_config.json.
CHECKPOINT_COMMON = dict(
    patch_size=16, temporal_patch_size=2, merge_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3
)
IMAGE_SIZE = {"shortest_edge": 65536, "longest_edge": 16777216}
VIDEO_SIZE = {"shortest_edge": 4096, "longest_edge": 25165824}


@pytest.fixture(scope="module")
def hf_image_processor():
    return transformers.Qwen2VLImageProcessor(size=IMAGE_SIZE, **CHECKPOINT_COMMON)


@pytest.fixture(scope="module")
def hf_pil_image_processor():
    return transformers.Qwen2VLImageProcessorPil(size=IMAGE_SIZE, **CHECKPOINT_COMMON)


@pytest.fixture(scope="module")
def hf_video_processor():
    return Qwen3VLVideoProcessor(
        size=VIDEO_SIZE, do_sample_frames=False, cap_pixels_per_frame=False, **CHECKPOINT_COMMON
    )


def random_pixels(*shape: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def gradient_image(height: int, width: int) -> np.ndarray:
    rows = np.linspace(0, 255, height)[:, None]  # (H, 1)
    cols = np.linspace(0, 255, width)[None, :]  # (1, W)
    red = np.broadcast_to(rows, (height, width))
    green = np.broadcast_to(cols, (height, width))
    blue = (red + green) / 2
    return np.stack([red, green, blue], axis=-1).round().astype(np.uint8)  # (H, W, 3)


def hf_image(processor, image: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    out = processor(images=image, return_tensors="pt", input_data_format="channels_last")
    return out["pixel_values"], out["image_grid_thw"]


def hf_video(processor, video: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    out = processor(videos=[video], return_tensors="pt", input_data_format="channels_last")
    return out["pixel_values_videos"], out["video_grid_thw"]


def assert_matches(ours, reference_pixels, reference_grid, *, exact: bool) -> None:
    assert torch.equal(ours.grid_thw, reference_grid)
    assert ours.pixel_values.dtype == torch.float32
    assert ours.pixel_values.shape == reference_pixels.shape
    difference = (ours.pixel_values - reference_pixels.float()).abs().max().item()
    if exact:
        assert difference == 0.0
    assert difference <= ROUNDING


IMAGE_CASES = [
    # (height, width, content): tiny (upscaled), odd, no resize, downscaled past max_pixels, thin
    (28, 28, "random"),
    (64, 40, "gradient"),
    (1, 200, "random"),
    (333, 517, "random"),
    (333, 517, "gradient"),
    (448, 448, "random"),
    (512, 320, "gradient"),
    (100, 1900, "random"),
    (1008, 1008, "gradient"),
    (4200, 4100, "random"),
]


@pytest.mark.parametrize("height,width,content", IMAGE_CASES)
def test_image_matches_hf_torchvision(hf_image_processor, height, width, content):
    seed = height * 10007 + width
    if content == "random":
        image = random_pixels(height, width, 3, seed=seed)
    else:
        image = gradient_image(height, width)
    reference_pixels, reference_grid = hf_image(hf_image_processor, image)
    ours = preprocess_image(image)
    needs_resize = tuple(s * 16 for s in ours.grid_thw[0, 1:].tolist()) != (height, width)
    assert_matches(ours, reference_pixels, reference_grid, exact=not needs_resize)


def test_image_input_forms_agree():
    """Torch tensors, strided views and read-only buffers give the same patches, silently."""
    image = random_pixels(333, 517, 3, seed=1)
    expected = preprocess_image(image).pixel_values
    read_only = np.frombuffer(image.tobytes(), dtype=np.uint8).reshape(image.shape)
    flipped_twice = np.ascontiguousarray(image[::-1])[::-1]  # negative strides
    padded = np.zeros((333, 600, 3), dtype=np.uint8)
    padded[:, :517] = image
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        strided = (padded[:, :517], torch.from_numpy(padded)[:, :517])
        for form in (torch.from_numpy(image), read_only, flipped_twice, *strided):
            assert torch.equal(preprocess_image(form).pixel_values, expected)


@pytest.mark.parametrize("height,width", [(28, 28), (333, 517), (448, 448), (100, 1900)])
def test_image_matches_hf_pil_backend_on_smooth_content(hf_pil_image_processor, height, width):
    """The PIL backend is another resize (Pillow picks its own pass order and precision).

    Hugging Face's two backends disagree by up to ~24 uint8 steps on random noise, where
    the clamping between the two passes depends on their order, and by up to 2 steps on
    smooth content; so this compares a gradient: same grid, pixels within two steps.
    """
    image = gradient_image(height, width)
    reference_pixels, reference_grid = hf_image(hf_pil_image_processor, image)
    ours = preprocess_image(image)
    assert torch.equal(ours.grid_thw, reference_grid)
    difference = (ours.pixel_values - reference_pixels.float()).abs()
    assert difference.max().item() <= 2 * ROUNDING
    assert (difference > 1e-6).float().mean().item() < 0.01


VIDEO_CASES = [
    # (frames, height, width): odd counts are padded; tiny sides are upscaled; 8×1536×2048
    # is exactly video_max_pixels (kept), 8×1600×2048 is over it in total (downscaled)
    (2, 28, 28),
    (3, 20, 30),
    (4, 333, 517),
    (5, 64, 40),
    (3, 100, 1900),
    (8, 448, 448),
    (8, 1536, 2048),
    (8, 1600, 2048),
]


@pytest.mark.parametrize("frames,height,width", VIDEO_CASES)
def test_video_matches_hf(hf_video_processor, frames, height, width):
    video = random_pixels(frames, height, width, 3, seed=frames * 7919 + height * 31 + width)
    reference_pixels, reference_grid = hf_video(hf_video_processor, video)
    ours = preprocess_video(video)
    needs_resize = tuple(s * 16 for s in ours.grid_thw[0, 1:].tolist()) != (height, width)
    assert_matches(ours, reference_pixels, reference_grid, exact=not needs_resize)


def test_video_downscale_counts_frames():
    """The same frame size gives a smaller grid in a long clip: limits apply to t*h*w."""
    short = preprocess_video(random_pixels(2, 1600, 2048, 3, seed=3))
    long = preprocess_video(random_pixels(10, 1600, 2048, 3, seed=3))
    assert short.grid_thw[0].tolist() == [1, 100, 128]
    assert long.grid_thw[0, 0] == 5 and long.grid_thw[0, 1] * long.grid_thw[0, 2] < 100 * 128


def test_one_frame_video_is_the_repeated_two_frame_clip(hf_video_processor):
    frame = random_pixels(1, 100, 200, 3, seed=5)
    reference_pixels, reference_grid = hf_video(hf_video_processor, np.concatenate([frame, frame]))
    assert_matches(preprocess_video(frame), reference_pixels, reference_grid, exact=False)


def test_image_columns_hold_two_equal_temporal_copies():
    ours = preprocess_image(gradient_image(64, 96))
    by_time = ours.pixel_values.view(-1, 3, 2, 16 * 16)  # (N, C, T, P*P)
    assert torch.equal(by_time[:, :, 0], by_time[:, :, 1])


def mixed_items() -> list[np.ndarray]:
    return [
        random_pixels(333, 517, 3, seed=10),
        random_pixels(3, 64, 40, 3, seed=11),
        random_pixels(3, 64, 40, 3, seed=12),  # adjacent twin of item 1: one patchify call
        gradient_image(448, 448),
        random_pixels(333, 517, 3, seed=13),  # same sizes as item 0, not adjacent
        random_pixels(4, 333, 517, 3, seed=14),  # same input size, other target size
        random_pixels(28, 28, 3, seed=15),
        random_pixels(28, 28, 3, seed=16),
        random_pixels(5, 64, 40, 3, seed=17),  # same sizes as items 1-2, other frame count
        random_pixels(1, 100, 200, 3, seed=18),
    ]


def per_item_reference(items: list[np.ndarray]):
    results = [preprocess_image(item) if item.ndim == 3 else preprocess_video(item) for item in items]
    pixels = torch.cat([result.pixel_values for result in results])
    grids = torch.cat([result.grid_thw for result in results])
    return pixels, grids


def test_batch_equals_per_item_in_input_order():
    items = mixed_items()
    reference_pixels, reference_grid = per_item_reference(items)
    batch = preprocess_batch(items, device="cpu")
    assert torch.equal(batch.grid_thw, reference_grid)
    assert torch.equal(batch.pixel_values, reference_pixels)


def test_batch_with_device_kernel_equals_per_item(monkeypatch):
    """The integer resize that runs on GPUs, exercised on the CPU through the batched path."""

    def portable_only(frames, height, width):
        if frames.shape[-2:] == (height, width):
            return frames
        return resize_uint8_portable(frames, height, width)

    monkeypatch.setattr(preprocess_api, "resize_uint8", portable_only)
    items = mixed_items()
    reference_pixels, reference_grid = per_item_reference(items)
    batch = preprocess_batch(items)
    assert torch.equal(batch.grid_thw, reference_grid)
    assert (batch.pixel_values - reference_pixels).abs().max().item() <= ROUNDING


def test_empty_batch():
    batch = preprocess_batch([])
    assert batch.pixel_values.shape == (0, PreprocessConfig().patch_dim)
    assert batch.grid_thw.shape == (0, 3)


@pytest.mark.parametrize(
    "in_size,out_size",
    [((333, 517), (320, 512)), ((28, 28), (256, 256)), ((7, 300), (32, 1376)), ((900, 640), (448, 320)),
     ((61, 1000), (64, 1024)), ((1200, 37), (96, 32))],
)
def test_portable_resize_equals_native_kernel(in_size, out_size):
    frames = torch.from_numpy(random_pixels(2, *in_size, 3, seed=sum(in_size))).permute(0, 3, 1, 2)
    native = resize_uint8_native(frames, *out_size).int()
    portable = resize_uint8_portable(frames, *out_size).int()
    # identical on x86 CPUs; at most a rare one-step flip where a compiler fuses the weight math
    assert (native - portable).abs().max().item() <= 1
    assert (native != portable).float().mean().item() < 1e-3


@pytest.mark.gpu
def test_batch_on_cuda_equals_cpu():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    items = mixed_items() + [random_pixels(4200, 4100, 3, seed=16), random_pixels(8, 1600, 2048, 3, seed=17)]
    reference_pixels, reference_grid = per_item_reference(items)
    batch = preprocess_batch(items, device="cuda")
    assert batch.pixel_values.device.type == "cuda"
    assert torch.equal(batch.grid_thw, reference_grid)
    assert (batch.pixel_values.cpu() - reference_pixels).abs().max().item() <= ROUNDING
    # tensors already on the GPU are accepted as they are
    on_device = [torch.from_numpy(item).cuda() for item in items]
    again = preprocess_batch(on_device, device="cuda")
    assert torch.equal(again.pixel_values, batch.pixel_values)
