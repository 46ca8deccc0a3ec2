"""Fill a CUDA GPU's memory, to exercise the out-of-memory fallback (used by a test and by check_cuda.py)."""
from __future__ import annotations

from typing import List

import torch


def fill_cuda_memory() -> List[torch.Tensor]:
    """Allocate until CUDA refuses; keep the returned tensors alive while the GPU must stay full."""
    free, _ = torch.cuda.mem_get_info()
    hog: List[torch.Tensor] = []
    try:
        while True:
            hog.append(torch.empty(max(free // 4, 1 << 20), dtype=torch.uint8, device="cuda"))
            free, _ = torch.cuda.mem_get_info()
    except torch.cuda.OutOfMemoryError:
        return hog
