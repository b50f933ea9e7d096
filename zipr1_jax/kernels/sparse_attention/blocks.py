"""Block sizes of the Pallas compact-attention kernels and their validation.

`BlockSizes.validate(platform, head_dim, dtype)` rejects a configuration with an error that names
the violated limit *before* Mosaic / Triton would fail (or silently spill):

- TPU (Mosaic): a block's last two dims must be multiples of the (8, 128) vreg tile. Query blocks
  are the second-minor dim (multiple of 8); key blocks become the lane dim of the score tile and
  of the key-position block (multiple of 128).
- TPU VMEM: the estimated working set (double-buffered input/output blocks + f32 scratch + the
  f32 score temporaries) must fit the scoped-VMEM default, which we take as 16 MiB (TPU v5e;
  v4/v5p/v6e default to 16-32 MiB, so 16 MiB is the safe common figure).
- Triton: every loaded tile dim must be a power of 2 and >= 16 (`tl.dot` minimum).
- GPU shared memory: the estimated per-block footprint (q tile + `num_stages` pipelined k/v tiles
  + score tile) must fit 227 KiB (H100: 228 KiB per SM, 227 KiB usable by one block).
"""

from __future__ import annotations

import dataclasses

import numpy as np

TPU_SUBLANE = 8
TPU_LANE = 128
TPU_VMEM_BUDGET_BYTES = 16 * 1024 * 1024
GPU_SMEM_BUDGET_BYTES = 227 * 1024
TRITON_MIN_DOT = 16

PLATFORMS = ("tpu", "triton")


def _is_pow2(x: int) -> bool:
    return x > 0 and (x & (x - 1)) == 0


def next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


@dataclasses.dataclass(frozen=True, kw_only=True)
class BlockSizes:
    """Tile sizes: forward (block_q, block_k), backward (block_q_bwd, block_k_bwd), decode
    (block_k_decode). `num_warps` / `num_stages` are Triton-only compiler params."""

    block_q: int
    block_k: int
    block_q_bwd: int
    block_k_bwd: int
    block_k_decode: int
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"BlockSizes.{f.name} must be a positive int, got {v!r}")

    @classmethod
    def default(cls, platform: str) -> "BlockSizes":
        if platform == "tpu":
            return cls(block_q=256, block_k=512, block_q_bwd=256, block_k_bwd=256, block_k_decode=512)
        if platform == "triton":
            return cls(block_q=64, block_k=64, block_q_bwd=32, block_k_bwd=32, block_k_decode=64,
                       num_warps=4, num_stages=2)
        raise ValueError(f"platform must be one of {PLATFORMS}, got {platform!r}")

    # ---- estimates -------------------------------------------------------------------------
    def vmem_bytes(self, head_dim: int, dtype) -> int:
        """Largest TPU VMEM working set over the forward / dq / dkv / decode kernels (bytes)."""
        it = np.dtype(dtype).itemsize
        h = head_dim

        def fwd(bq, bk):
            blocks = 2 * (2 * bq * h * it + 2 * bk * h * it + bq * TPU_LANE * 4 * 2 + TPU_SUBLANE * bk * 4)
            scratch = 2 * bq * TPU_LANE * 4 + bq * h * 4
            temps = 3 * bq * bk * 4
            return blocks + scratch + temps

        def bwd(bq, bk):
            blocks = 2 * (3 * bq * h * it + 4 * bk * h * it + 3 * bq * TPU_LANE * 4 + TPU_SUBLANE * bk * 4)
            scratch = 2 * bk * h * 4 + bq * h * 4
            temps = 5 * bq * bk * 4
            return blocks + scratch + temps

        return max(fwd(self.block_q, self.block_k), bwd(self.block_q_bwd, self.block_k_bwd),
                   fwd(TPU_SUBLANE * 4, self.block_k_decode))

    def smem_bytes(self, head_dim: int, dtype) -> int:
        """Largest Triton shared-memory footprint per program (bytes), pipelined k/v tiles included."""
        it = np.dtype(dtype).itemsize
        h = next_pow2(head_dim)
        st = self.num_stages

        def est(bq, bk, n_q_tiles):
            return n_q_tiles * bq * h * it + st * 2 * bk * h * it + bq * bk * 4

        return max(est(self.block_q, self.block_k, 1), est(self.block_q_bwd, self.block_k_bwd, 2),
                   est(TRITON_MIN_DOT, self.block_k_decode, 1))

    # ---- validation ------------------------------------------------------------------------
    def validate(self, platform: str, head_dim: int, dtype) -> "BlockSizes":
        if platform == "tpu":
            for name in ("block_q", "block_q_bwd"):
                v = getattr(self, name)
                if v % TPU_SUBLANE:
                    raise ValueError(f"TPU tiling: BlockSizes.{name}={v} must be a multiple of "
                                     f"{TPU_SUBLANE} (sublane dim of the (8, 128) tile)")
            for name in ("block_k", "block_k_bwd", "block_k_decode"):
                v = getattr(self, name)
                if v % TPU_LANE:
                    raise ValueError(f"TPU tiling: BlockSizes.{name}={v} must be a multiple of "
                                     f"{TPU_LANE} (lane dim of the (8, 128) tile)")
            need = self.vmem_bytes(head_dim, dtype)
            if need > TPU_VMEM_BUDGET_BYTES:
                raise ValueError(
                    f"TPU VMEM budget: {self} with head_dim={head_dim}, dtype={np.dtype(dtype).name} needs "
                    f"~{need / 2**20:.1f} MiB > {TPU_VMEM_BUDGET_BYTES / 2**20:.0f} MiB scoped VMEM "
                    "(v5e default); use smaller blocks")
        elif platform == "triton":
            for f in ("block_q", "block_k", "block_q_bwd", "block_k_bwd", "block_k_decode"):
                v = getattr(self, f)
                if not _is_pow2(v) or v < TRITON_MIN_DOT:
                    raise ValueError(f"Triton: BlockSizes.{f}={v} must be a power of 2 and >= "
                                     f"{TRITON_MIN_DOT} (tl.dot minimum)")
            need = self.smem_bytes(head_dim, dtype)
            if need > GPU_SMEM_BUDGET_BYTES:
                raise ValueError(
                    f"GPU shared memory budget: {self} with head_dim={head_dim}, "
                    f"dtype={np.dtype(dtype).name} needs ~{need / 1024:.0f} KiB > "
                    f"{GPU_SMEM_BUDGET_BYTES // 1024} KiB usable per block (H100: 228 KiB per SM); "
                    "use smaller blocks or fewer num_stages")
        else:
            raise ValueError(f"platform must be one of {PLATFORMS}, got {platform!r}")
        return self
