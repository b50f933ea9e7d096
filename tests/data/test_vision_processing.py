"""Parity of zipr1_jax.data.vision with transformers' Qwen2-VL image processor (PIL backend)."""

import os

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
from transformers import Qwen2VLImageProcessorPil  # noqa: E402
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import \
    smart_resize as hf_smart_resize  # noqa: E402

from zipr1_jax.data import vision  # noqa: E402

SIZES = [(56, 56), (37, 100), (224, 336), (480, 640), (700, 60), (29, 29), (10, 20)]


def _image(h, w, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("h,w", SIZES)
@pytest.mark.parametrize("pixels", [{}, {"min_pixels": 128 * 28 * 28, "max_pixels": 256 * 28 * 28},
                                    {"min_pixels": 56 * 56, "max_pixels": 64 * 28 * 28}])
def test_image_parity(h, w, pixels):
  img = _image(h, w)
  ref = Qwen2VLImageProcessorPil(**pixels)(images=[img], return_tensors="np")
  pv, grid = vision.process_image(img, **pixels)
  assert pv.dtype == np.float32 and grid.dtype == np.int64
  np.testing.assert_array_equal(grid, ref["image_grid_thw"][0])
  np.testing.assert_allclose(pv, ref["pixel_values"], atol=1e-5, rtol=0)


def test_batch_parity_and_token_count():
  imgs = [_image(56, 56, 1), _image(224, 336, 2), _image(90, 40, 3)]
  ref = Qwen2VLImageProcessorPil()(images=imgs, return_tensors="np")
  pv, grids = vision.process_images(imgs)
  np.testing.assert_array_equal(grids, ref["image_grid_thw"])
  np.testing.assert_allclose(pv, ref["pixel_values"], atol=1e-5, rtol=0)
  assert pv.shape[0] == grids.prod(-1).sum()
  np.testing.assert_array_equal(vision.num_image_tokens(grids), grids.prod(-1) // 4)
  assert vision.num_image_tokens(grids[0]) == 4


def test_input_kinds_pil_path_rgba_gray(tmp_path):
  img = _image(60, 90)
  base, _ = vision.process_image(img)
  np.testing.assert_array_equal(vision.process_image(Image.fromarray(img))[0], base)
  path = tmp_path / "a.png"
  Image.fromarray(img).save(path)
  np.testing.assert_array_equal(vision.process_image(str(path))[0], base)
  rgba = Image.fromarray(np.concatenate([img, np.full((60, 90, 1), 7, np.uint8)], -1), "RGBA")
  ref = Qwen2VLImageProcessorPil()(images=[rgba], return_tensors="np")["pixel_values"]
  np.testing.assert_allclose(vision.process_image(rgba)[0], ref, atol=1e-5, rtol=0)
  rgba_arr = np.asarray(rgba)
  np.testing.assert_allclose(vision.process_image(rgba_arr)[0], ref, atol=1e-5, rtol=0)
  ref_arr = Qwen2VLImageProcessorPil()(images=[rgba_arr], return_tensors="np")["pixel_values"]
  np.testing.assert_allclose(vision.process_image(rgba_arr)[0], ref_arr, atol=1e-5, rtol=0)
  gray = Image.fromarray(img[..., 0], "L")
  ref = Qwen2VLImageProcessorPil()(images=[gray], return_tensors="np")["pixel_values"]
  np.testing.assert_allclose(vision.process_image(gray)[0], ref, atol=1e-5, rtol=0)
  np.testing.assert_allclose(vision.process_image(img[..., 0])[0], ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("num_frames", [1, 3, 4])
def test_video_matches_per_frame_image_processing(num_frames):
  # transformers' Qwen2VLVideoProcessor imports torchvision (not installed here), so the video
  # reference is built from the image processor's per-frame normalised pixels, paired in time
  # the way HF's video patchify does (last frame repeated to a multiple of temporal_patch_size).
  frames = np.stack([_image(84, 112, 10 + i) for i in range(num_frames)])
  kw = {"min_pixels": 56 * 56, "max_pixels": 28 * 28 * 768}
  pv, grid = vision.process_video(frames, **kw)
  t_pad = -(-num_frames // 2) * 2
  per_frame = [Qwen2VLImageProcessorPil(**kw)(images=[f], return_tensors="np")
               for f in frames]
  gh, gw = per_frame[0]["image_grid_thw"][0, 1:]
  np.testing.assert_array_equal(grid, [t_pad // 2, gh, gw])
  # Each HF image row is [C, tp, p, p] with the frame repeated; take one temporal copy.
  rows = [r["pixel_values"].reshape(gh * gw, 3, 2, 14, 14)[:, :, 0] for r in per_frame]
  rows += [rows[-1]] * (t_pad - num_frames)
  expected = np.stack([np.stack(rows[2 * i:2 * i + 2], 2) for i in range(t_pad // 2)])
  np.testing.assert_allclose(pv, expected.reshape(-1, 3 * 2 * 14 * 14), atol=1e-5, rtol=0)


def test_single_frame_video_equals_image():
  img = _image(112, 84)
  pv_v, g_v = vision.process_video([img], min_pixels=56 * 56, max_pixels=28 * 28 * 1280)
  pv_i, g_i = vision.process_image(img)
  np.testing.assert_array_equal(g_v, g_i)
  np.testing.assert_allclose(pv_v, pv_i, atol=1e-6, rtol=0)


@pytest.mark.parametrize("h,w", [(10, 10), (33, 57), (1000, 7), (3000, 4000), (14, 2000)])
@pytest.mark.parametrize("mn,mx", [(56 * 56, 28 * 28 * 1280), (4 * 28 * 28, 16 * 28 * 28)])
def test_smart_resize_matches_hf(h, w, mn, mx):
  if max(h, w) / min(h, w) > 200:
    with pytest.raises(ValueError, match="aspect ratio"):
      vision.smart_resize(h, w, 28, mn, mx)
    with pytest.raises(ValueError):
      hf_smart_resize(h, w, 28, mn, mx)
  else:
    assert vision.smart_resize(h, w, 28, mn, mx) == hf_smart_resize(h, w, 28, mn, mx)


def test_errors_name_the_item(tmp_path):
  with pytest.raises(ValueError, match=r"image\[1\].*aspect ratio"):
    vision.process_images([_image(56, 56), _image(2, 500)])
  with pytest.raises(ValueError, match="channels"):
    vision.process_image(np.zeros((56, 56, 2), np.uint8))
  with pytest.raises(ValueError, match="uint8"):
    vision.process_image(np.zeros((56, 56, 3), np.float32))
  with pytest.raises(ValueError, match="HxWx3"):
    vision.process_image(np.zeros((2, 56, 56, 3), np.uint8))
  with pytest.raises(ValueError, match="empty"):
    vision.process_image(np.zeros((0, 56, 3), np.uint8))
  bad = tmp_path / "corrupt.png"
  bad.write_bytes(b"not a png")
  with pytest.raises(ValueError, match="corrupt.png"):
    vision.process_image(str(bad))
  with pytest.raises(ValueError, match="missing.png"):
    vision.process_image(str(tmp_path / "missing.png"))
  with pytest.raises(ValueError, match="frame 1"):
    vision.process_video([_image(56, 56), _image(56, 84)])
  with pytest.raises(ValueError, match="at least one frame"):
    vision.process_video([])
  with pytest.raises(ValueError, match="empty list"):
    vision.process_images([])
  with pytest.raises(ValueError, match="min_pixels"):
    vision.VisionProcessorConfig(min_pixels=100, max_pixels=10)
  with pytest.raises(ValueError, match="patch_size"):
    vision.VisionProcessorConfig(patch_size=0)
