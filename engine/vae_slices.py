"""VAE decode in slices of the batch, so the decoder's activations fit a small device.

The decoder works on each image on its own (convolutions, GroupNorm and attention never mix images
of a batch), so decoding images [0, n), [n, 2n), ... into the same image buffer gives the same
pixels as decoding the whole batch at once. Each slice size gets its bindings once per shape plan
(sdrt.engine.pipeline), over rows of the plan's latents and image buffers (buffers.Rows).

Automatic slice size (GPU backends that size their activations themselves, i.e. ONNX Runtime):
the largest n with n * per_image <= budget, where budget = VAE_BUDGET_FRACTION of the device memory
free once the plan is loaded, and per_image is the estimate below.
"""
from __future__ import annotations

# Peak activation of the SD 1.x/2.x VAE decoder per output pixel, FP16: `sdrt memory` measures the
# sd15 export's decoder at 448 MiB for one 512x512 image (its last up-blocks hold several
# [128..256, H, W] tensors at once) = 1792 bytes per pixel. FP32 doubles it. An estimate for
# choosing a slice size, deliberately on the high side for smaller VAEs.
VAE_BYTES_PER_PIXEL_FP16 = 448 * 2 ** 20 // (512 * 512)
VAE_BUDGET_FRACTION = 0.5     # leave the other half of free memory to arenas, workspaces, the OS


def vae_bytes_per_image(height: int, width: int, precision: str) -> int:
    """Estimated peak activation bytes of decoding one height x width image."""
    return VAE_BYTES_PER_PIXEL_FP16 * height * width * (2 if precision == "fp32" else 1)


def slice_size(batch: int, per_image: int, budget: int) -> int:
    """Images per VAE run: the whole batch if it fits `budget`, else as many as fit (at least 1)."""
    if batch * per_image <= budget:
        return batch
    return max(1, min(batch, budget // max(per_image, 1)))


def slices(batch: int, size: int) -> list[tuple[int, int]]:
    """[(start, n)] covering the batch in runs of `size` images (the last may be smaller)."""
    return [(start, min(size, batch - start)) for start in range(0, batch, size)]
