"""k-space conventions shared by the degradation transforms and the data-consistency layers.

Convention used everywhere in this bundle:

* A 2D multi-slice acquisition is stored in the image's own array layout, channel first
  ``(C, X, Y, Z)``. The slice axis is one spatial axis; the other two are the in-plane axes.
* The k-space of every slice is the centred, orthonormal 2D DFT over the two in-plane axes
  (DC at index ``n // 2``, as ``numpy.fft.fftshift(fft2(ifftshift(x), norm="ortho"))`` and as
  ``monai.data.fft_utils.fftn_centered``). It is a complex tensor with the image's shape.
* The sampling mask is a boolean tensor broadcastable to the k-space: size 1 on every axis but
  the phase-encode axis, ``True`` where a phase-encode line was acquired.
"""

from __future__ import annotations

import torch


def fft2c(image: torch.Tensor, dims: list[int]) -> torch.Tensor:
    """Centred orthonormal 2D DFT of ``image`` over ``dims`` (a list or tuple; real or complex input)."""
    dims = list(dims)
    shifted = torch.fft.ifftshift(image, dim=dims)
    return torch.fft.fftshift(torch.fft.fftn(shifted, dim=dims, norm="ortho"), dim=dims)


def ifft2c(kspace: torch.Tensor, dims: list[int]) -> torch.Tensor:
    """Inverse of :func:`fft2c`; returns a complex image."""
    dims = list(dims)
    shifted = torch.fft.ifftshift(kspace, dim=dims)
    return torch.fft.fftshift(torch.fft.ifftn(shifted, dim=dims, norm="ortho"), dim=dims)


def data_consistency(
    image: torch.Tensor, measured_kspace: torch.Tensor, mask: torch.Tensor, dims: list[int]
) -> torch.Tensor:
    """Replace the acquired k-space lines of ``image`` by the measured ones; return the magnitude.

    ``image`` is a real (magnitude) estimate, ``measured_kspace`` the complex k-space that was
    acquired (zero where not sampled) and ``mask`` the boolean sampling mask, all following the
    module convention. Lines outside the mask keep the estimate's own k-space. TorchScript-compatible.
    """
    estimate = fft2c(image.to(measured_kspace.dtype), dims)
    projected = torch.where(mask, measured_kspace, estimate)
    return ifft2c(projected, dims).abs().to(image.dtype)
