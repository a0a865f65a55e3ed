"""Block-sparse rows (BSR) of a conv/linear weight, and a plain-torch reference of the BSR kernels.

The matrix is the GEMM view a convolution multiplies (``rsp.structure.gemm_view``): a conv weight
(out, in, kh, kw) is ``out x (in*kh*kw)`` with column ``k = (c*kh + i)*kw + j``, a linear weight
``out x in`` is itself. It is cut into blocks of R rows x C columns; ragged edges are padded with zeros
to whole blocks (``padded_shape``). Only blocks holding at least one non-zero are stored:

- ``row_ptr`` (n_block_rows + 1,) int64: the blocks of block row ``i`` are ``row_ptr[i]:row_ptr[i+1]``;
- ``col_idx`` (nnzb,) int64: each stored block's block-column, ascending within a block row;
- ``values`` (nnzb, R, C): the blocks, dense (zeros inside a stored block are kept).

The reference ``bsr_conv2d`` / ``bsr_linear`` compute exactly what ``F.conv2d`` / ``F.linear`` compute,
as the CUDA kernels do: im2col (``F.unfold``), then a block GEMM that touches only the stored blocks
(gather the C im2col rows of each block's column, multiply by the R x C block, add into the block's R
output rows). Nothing here needs a GPU; it is what the tests compare the generated kernels against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

Block = tuple[int, int]

# Blocks the planner tries by default: unstructured, short columns/rows, square, and the tall shapes
# ``rsp structure`` reports (zero-block shares 1x4, 4x4, 16x1, 32x1).
DEFAULT_BLOCKS: tuple[Block, ...] = ((1, 1), (4, 1), (1, 4), (2, 2), (4, 4), (8, 1), (16, 1), (32, 1))

# Elements one chunk of the reference block GEMM may materialise (gathered inputs x block rows).
_CHUNK_ELEMS = 1 << 24


def parse_block(block) -> Block:
    """(R, C) from a tuple/list or a string 'RxC'."""
    if isinstance(block, str):
        parts = block.lower().split("x")
        if len(parts) != 2:
            raise ValueError(f"block must look like 'RxC', got {block!r}")
        block = (int(parts[0]), int(parts[1]))
    r, c = (int(v) for v in block)
    if r < 1 or c < 1:
        raise ValueError(f"block dimensions must be >= 1, got {block!r}")
    return r, c


def gemm_matrix(w: torch.Tensor) -> torch.Tensor:
    """out x (in*kh*kw) for a conv weight (OIHW), the matrix itself for a linear weight."""
    if w.dim() not in (2, 4):
        raise ValueError(f"expected a linear (2-D) or conv (4-D OIHW) weight, got shape {tuple(w.shape)}")
    return w.reshape(w.shape[0], -1)


@dataclass(frozen=True)
class BSR:
    weight_shape: tuple[int, ...]  # the original weight's shape (OIHW or out x in)
    block: Block
    row_ptr: torch.Tensor  # (n_block_rows + 1,) int64
    col_idx: torch.Tensor  # (nnzb,) int64
    values: torch.Tensor  # (nnzb, R, C)

    @property
    def shape(self) -> tuple[int, int]:
        """GEMM shape (rows, cols), unpadded."""
        rows = self.weight_shape[0]
        cols = 1
        for d in self.weight_shape[1:]:
            cols *= d
        return rows, cols

    @property
    def grid(self) -> tuple[int, int]:
        """(block rows, block columns)."""
        (m, k), (r, c) = self.shape, self.block
        return -(-m // r), -(-k // c)

    @property
    def padded_shape(self) -> tuple[int, int]:
        (br, bc), (r, c) = self.grid, self.block
        return br * r, bc * c

    @property
    def nnzb(self) -> int:
        return int(self.col_idx.numel())

    @property
    def block_density(self) -> float:
        """Stored blocks / all blocks of the padded matrix."""
        br, bc = self.grid
        return self.nnzb / (br * bc) if br * bc else 0.0

    @property
    def nnz(self) -> int:
        """Non-zero weights (zeros inside stored blocks not counted)."""
        return int((self.values != 0).sum())

    @property
    def density(self) -> float:
        m, k = self.shape
        return self.nnz / (m * k) if m * k else 0.0

    @property
    def fill(self) -> float:
        """Non-zero share inside the stored blocks (1.0: the blocks hold no explicit zeros)."""
        stored = self.values.numel()
        return self.nnz / stored if stored else 1.0

    def block_rows(self) -> torch.Tensor:
        """The block row of every stored block, (nnzb,) int64."""
        counts = self.row_ptr[1:] - self.row_ptr[:-1]
        return torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts)

    def to(self, device=None, dtype=None) -> "BSR":
        """The same BSR on another device and/or with values of another dtype."""
        return BSR(self.weight_shape, self.block, self.row_ptr.to(device), self.col_idx.to(device),
                   self.values.to(device=device, dtype=dtype))


def to_bsr(w: torch.Tensor, block=(1, 1)) -> BSR:
    """The BSR form of a conv (OIHW) or linear (out x in) weight with blocks of R x C (ragged edges padded)."""
    r, c = parse_block(block)
    g = gemm_matrix(w.detach())
    m, k = g.shape
    br, bc = -(-m // r), -(-k // c)
    padded = g.new_zeros(br * r, bc * c)
    padded[:m, :k] = g
    blocks = padded.reshape(br, r, bc, c).permute(0, 2, 1, 3)  # (br, bc, R, C)
    keep = (blocks != 0).flatten(2).any(2)  # (br, bc)
    rows, cols = keep.nonzero(as_tuple=True)  # row-major: block rows ascending, columns ascending within
    counts = keep.sum(1)
    row_ptr = torch.zeros(br + 1, dtype=torch.int64, device=g.device)
    row_ptr[1:] = torch.cumsum(counts, 0)
    return BSR(tuple(w.shape), (r, c), row_ptr, cols.to(torch.int64), blocks[rows, cols].contiguous())


def from_bsr(b: BSR) -> torch.Tensor:
    """The dense weight (original shape) a BSR holds."""
    (br, bc), (r, c) = b.grid, b.block
    blocks = b.values.new_zeros(br, bc, r, c)
    if b.nnzb:
        blocks[b.block_rows(), b.col_idx] = b.values
    m, k = b.shape
    return blocks.permute(0, 2, 1, 3).reshape(br * r, bc * c)[:m, :k].reshape(b.weight_shape).clone()


def block_density(w: torch.Tensor, block) -> float:
    """Share of R x C blocks (ragged edges padded) of the GEMM view that hold a non-zero."""
    r, c = parse_block(block)
    g = gemm_matrix(w) != 0
    m, k = g.shape
    br, bc = -(-m // r), -(-k // c)
    padded = torch.zeros(br * r, bc * c, dtype=torch.bool, device=g.device)
    padded[:m, :k] = g
    return padded.reshape(br, r, bc, c).any(3).any(1).float().mean().item()


def bsr_matmul(b: BSR, cols: torch.Tensor) -> torch.Tensor:
    """W @ cols over the stored blocks only: cols (N, K, L) -> (N, M, L) (K, M unpadded GEMM sizes).

    Each stored block (row i, column j) gathers the C rows ``j*C:(j+1)*C`` of cols, multiplies them by its
    R x C values and adds the result into output rows ``i*R:(i+1)*R``. Blocks are processed in chunks so
    the gathered operand never exceeds a fixed size, whatever the batch and density.
    """
    m, k = b.shape
    (br, bc), (r, c) = b.grid, b.block
    if cols.dim() != 3 or cols.shape[1] != k:
        raise ValueError(f"cols must be (N, {k}, L), got {tuple(cols.shape)}")
    n, _, length = cols.shape
    values = b.values.to(cols.dtype)
    # (K, N*L): each GEMM column's inputs contiguous, so gathering a block's C rows is a row copy.
    rows = cols.permute(1, 0, 2).reshape(k, n * length)
    if bc * c != k:
        rows = F.pad(rows, (0, 0, 0, bc * c - k))
    colb = rows.reshape(bc, c, n * length)
    out = rows.new_zeros(br, r, n * length)
    if b.nnzb:
        brow = b.block_rows().to(cols.device)
        bcol = b.col_idx.to(cols.device)
        step = max(1, _CHUNK_ELEMS // max(1, max(r, c) * n * length))
        for s in range(0, b.nnzb, step):
            e = min(b.nnzb, s + step)
            gathered = colb[bcol[s:e]]  # (nb, C, N*L)
            if c == 1:
                prod = values[s:e] * gathered  # (nb, R, 1) * (nb, 1, N*L)
            else:
                prod = torch.bmm(values[s:e], gathered)  # (nb, R, N*L)
            out.index_add_(0, brow[s:e], prod)
    return out.reshape(br * r, n, length)[:m].permute(1, 0, 2)


def _pair(v) -> tuple[int, int]:
    if isinstance(v, int):
        return v, v
    a, b = v
    return int(a), int(b)


def bsr_conv2d(x: torch.Tensor, b: BSR, bias: torch.Tensor | None = None, stride=1, padding=0,
               dilation=1) -> torch.Tensor:
    """F.conv2d(x, from_bsr(b), bias, stride, padding, dilation) through im2col and the block GEMM."""
    if len(b.weight_shape) != 4:
        raise ValueError(f"bsr_conv2d needs a conv (OIHW) weight, got shape {b.weight_shape}")
    out_ch, in_ch, kh, kw = b.weight_shape
    if x.dim() != 4 or x.shape[1] != in_ch:
        raise ValueError(f"x must be (N, {in_ch}, H, W), got {tuple(x.shape)}")
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    n, _, h, w = x.shape
    oh = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    if oh <= 0 or ow <= 0:
        raise ValueError(f"output would be empty: input {h}x{w}, kernel {kh}x{kw}, stride {stride}, padding {padding}")
    cols = F.unfold(x, (kh, kw), dilation=dilation, padding=padding, stride=stride)  # (N, in*kh*kw, oh*ow)
    y = bsr_matmul(b, cols)
    if bias is not None:
        y = y + bias.to(y.dtype).reshape(1, -1, 1)
    return y.reshape(n, out_ch, oh, ow)


def bsr_linear(x: torch.Tensor, b: BSR, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, from_bsr(b), bias) through the block GEMM (x (..., in) -> (..., out))."""
    if len(b.weight_shape) != 2:
        raise ValueError(f"bsr_linear needs a linear (out x in) weight, got shape {b.weight_shape}")
    out_f, in_f = b.weight_shape
    if x.shape[-1] != in_f:
        raise ValueError(f"x must end in {in_f} features, got {tuple(x.shape)}")
    lead = x.shape[:-1]
    y = bsr_matmul(b, x.reshape(-1, in_f, 1))[:, :, 0]
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.reshape(*lead, out_f)
