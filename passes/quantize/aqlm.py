"""AQLM: additive quantization with learned codebooks, 2 bits a weight.

Egiazarian, Panferov, Kuznedelev, Frantar, Babenko, Alistarh, "Extreme Compression of Large
Language Models via Additive Quantization", ICML 2024 (arXiv:2401.06118). Each group of g
consecutive input weights of a row is the sum of M codewords, one from each of M codebooks of
256 g-dimensional vectors, times a scale per row (layout: flashc/codebook_ops.py). The fit
minimises the calibration output error tr(dW H dW^T), H = mean x x^T, as the paper does, with
our own (cheaper, CPU-sized) schedule:

1. initialisation by residual k-means: codebook 1 by k-means of the row-normalised groups,
   codebook 2 by k-means of what is left, each point weighted by H's diagonal on its columns;
2. rounds of
   * code selection: coordinate descent over (group, codebook), all rows at once; the exact
     change of tr(dW H dW^T) is scored for all 256 codewords (GPTQ-like bookkeeping of dW H),
     so a step never raises the error (the paper uses beam search here);
   * codebook refit: the least-squares codebooks for these codes under H, solved by conjugate
     gradients from the current ones (monotone on a convex quadratic; the paper uses Adam);
   * scale refit: each row's least-squares scale under H.

H is dampened as GPTQ's (damp x its mean diagonal added), which also keeps inputs the
calibration never saw weighted; an H of zeros (an expert no token reached) becomes I, a plain
squared error. Leading dimensions of w are independent problems solved together (a MoE
layer's experts, each with its own H and codebooks).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from flashc.codebook_ops import decode_aqlm
from flashc.errors import FlashcError

CODE_BITS = 8  # uint8 codes: 256 codewords a codebook (the paper's 2x8 configuration)
KMEANS_POINTS = 16  # groups sampled a codeword for the k-means initialisation


@dataclass(frozen=True)
class AqlmWeight:
    """A weight [..., N, K] as AQLM codes [..., N, K/g, M], codebooks [..., M, 256, g], scales [..., N]."""

    codes: torch.Tensor
    codebooks: torch.Tensor
    scales: torch.Tensor

    def dequantize(self) -> torch.Tensor:
        """The float64 weight these codes stand for (decoded from the stored values)."""
        lead = self.codes.shape[:-3]
        codes = self.codes.reshape(-1, *self.codes.shape[-3:])
        books = self.codebooks.reshape(-1, *self.codebooks.shape[-3:])
        scales = self.scales.reshape(-1, self.scales.shape[-1])
        w = torch.stack([decode_aqlm(c, b, s, torch.float64) for c, b, s in zip(codes, books, scales)])
        return w.reshape(*lead, *w.shape[-2:])

    def __getitem__(self, index: int) -> "AqlmWeight":
        return AqlmWeight(self.codes[index], self.codebooks[index], self.scales[index])


@dataclass(frozen=True)
class AqlmFit:
    """The quantized weight and the relative H-weighted error sqrt(tr(dW H dW^T) / tr(W H W^T))
    (dampened H: the objective), worst problem of the batch: after initialisation, after each
    round, and last for the stored weight (codebooks and scales rounded to their dtype)."""

    weight: AqlmWeight
    errors: list[float]


def aqlm_quantize(w: torch.Tensor, hessian: torch.Tensor, codebooks: int = 2, group_size: int = 8,
                  rounds: int = 4, damp: float = 0.01, kmeans_iters: int = 8, cg_iters: int = 24,
                  storage_dtype: torch.dtype | None = None, seed: int = 0, progress: bool = False) -> AqlmFit:
    """Fit AQLM codes, codebooks and scales to w [..., N, K] given hessian [..., K, K] = mean x x^T.

    codebooks (M) of 256 codewords of group_size (g) values: M * 8 / g bits a weight. Codebooks and
    scales are stored in storage_dtype (default w's); the last code selection runs on the stored
    values, so the error reported is the stored weight's.
    """
    *lead, n, k = w.shape
    if tuple(hessian.shape) != (*lead, k, k):
        raise FlashcError(f"AQLM: Hessian {tuple(hessian.shape)} does not match a weight {tuple(w.shape)}")
    if k % group_size:
        raise FlashcError(f"AQLM: {k} input columns are not a multiple of the group size {group_size}")
    dtype = storage_dtype or w.dtype
    weight = w.detach().double().reshape(-1, n, k)
    h = _dampened(hessian.detach().double().reshape(-1, k, k), damp)
    generator = torch.Generator(device="cpu").manual_seed(seed)

    scales = _stored(weight.pow(2).mean(-1).sqrt(), dtype)
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    books = _init_codebooks(weight / scales[..., None], h, scales, codebooks, group_size, kmeans_iters, generator)
    codes = _nearest_codes(weight / scales[..., None], books, group_size)
    base = _quadratic(weight, h)
    errors = [_relative(weight, codes, books, scales, h, base)]
    for _ in tqdm(range(rounds), desc="AQLM rounds", unit="round", disable=not progress, leave=False):
        codes = _select_codes(weight, codes, books, scales, h)
        books = _refit_codebooks(weight, codes, books, scales, h, cg_iters)
        scales = _refit_scales(weight, codes, books, scales, h)
        errors.append(_relative(weight, codes, books, scales, h, base))
    # stored values: round, then choose the codes for exactly what is stored
    books, scales = _stored(books, dtype), _stored(scales, dtype)
    codes = _select_codes(weight, codes, books, scales, h)
    errors.append(_relative(weight, codes, books, scales, h, base))
    fit = AqlmWeight(codes.to(torch.uint8).reshape(*lead, n, k // group_size, codebooks),
                     books.to(dtype).reshape(*lead, codebooks, 1 << CODE_BITS, group_size),
                     scales.to(dtype).reshape(*lead, n))
    return AqlmFit(fit, errors)


# ------------------------------------------------------------------------------ pieces
# Shapes: weight [B, N, K], h [B, K, K], codes long [B, N, J, M] (J = K / g groups),
# books [B, M, 256, g], scales [B, N]; all float64.


def _stored(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype).double()


def _dampened(h: torch.Tensor, damp: float) -> torch.Tensor:
    eye = torch.eye(h.shape[-1], dtype=h.dtype, device=h.device)
    mean_diag = torch.diagonal(h, dim1=-2, dim2=-1).mean(-1)[:, None, None]
    return torch.where(mean_diag > 0, h + damp * mean_diag * eye, eye)


def _quadratic(delta: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """tr(delta H delta^T) per problem [B]."""
    return ((delta @ h) * delta).sum((-2, -1))


def _decode(codes: torch.Tensor, books: torch.Tensor) -> torch.Tensor:
    """Unscaled sum of codewords [B, N, K]."""
    b, n, j, m = codes.shape
    flat = books.reshape(b, -1, books.shape[-1])  # [B, M * 256, g]
    index = codes + torch.arange(m, device=codes.device) * (1 << CODE_BITS)
    words = flat.gather(1, index.reshape(b, -1, 1).expand(-1, -1, flat.shape[-1]))
    return words.reshape(b, n, j, m, -1).sum(3).reshape(b, n, -1)


def _relative(weight, codes, books, scales, h, base) -> float:
    delta = weight - scales[..., None] * _decode(codes, books)
    return float((_quadratic(delta, h) / base.clamp_min(1e-300)).sqrt().max())


def _kmeans(points: torch.Tensor, weights: torch.Tensor, clusters: int, iters: int,
            generator: torch.Generator) -> torch.Tensor:
    """Weighted k-means [B, P, g] -> centroids [B, clusters, g]; the distance of a point to a
    centroid is sum_d weights[d] (p_d - c_d)^2 with the point's own weights [B, P, g]."""
    b, p, g = points.shape
    start = torch.randint(0, p, (b, clusters), generator=generator).to(points.device)
    centroids = points.gather(1, start[..., None].expand(-1, -1, g)).clone()
    wp = weights * points
    for _ in range(iters):
        # sum w c^2 - 2 sum w p c, per point and centroid (the point's own sum w p^2 is constant)
        distance = weights @ centroids.pow(2).transpose(1, 2) - 2 * wp @ centroids.transpose(1, 2)
        assign = distance.argmin(-1)
        mass = torch.zeros(b, clusters, g, dtype=points.dtype, device=points.device)
        mass.scatter_add_(1, assign[..., None].expand(-1, -1, g), weights)
        total = torch.zeros_like(mass).scatter_add_(1, assign[..., None].expand(-1, -1, g), wp)
        # an empty cluster keeps its centroid (it may be chosen later, after refits)
        centroids = torch.where(mass > 0, total / mass.clamp_min(1e-300), centroids)
    return centroids


def _init_codebooks(normalized: torch.Tensor, h: torch.Tensor, scales: torch.Tensor, codebooks: int,
                    group_size: int, iters: int, generator: torch.Generator) -> torch.Tensor:
    """Residual k-means: codebook m fits what codebooks 0..m-1 left, each group weighted by
    diag(H) on its columns times its row's scale squared (its share of the output error)."""
    b, n, k = normalized.shape
    points = normalized.reshape(b, -1, group_size)
    diag = torch.diagonal(h, dim1=-2, dim2=-1).reshape(b, 1, k // group_size, group_size)
    weights = (diag * scales.pow(2)[..., None, None]).reshape(b, -1, group_size)
    # k-means runs in float32 on a sample of KMEANS_POINTS points a codeword (a start point only:
    # the rounds refine it in float64); every group is then assigned to its nearest centroid
    p = points.shape[1]
    sample = torch.randperm(p, generator=generator)[: KMEANS_POINTS << CODE_BITS].to(points.device)
    books = []
    for _ in range(codebooks):
        centroids = _kmeans(points[:, sample].float(), weights[:, sample].float(), 1 << CODE_BITS, iters,
                            generator).double()
        books.append(centroids)
        distance = weights @ centroids.pow(2).transpose(1, 2) - 2 * (weights * points) @ centroids.transpose(1, 2)
        points = points - centroids.gather(1, distance.argmin(-1)[..., None].expand(-1, -1, group_size))
    return torch.stack(books, 1)


def _nearest_codes(normalized: torch.Tensor, books: torch.Tensor, group_size: int) -> torch.Tensor:
    """Greedy residual assignment (codebook after codebook, plain squared distance): the start point."""
    b, n, k = normalized.shape
    residual = normalized.reshape(b, -1, group_size)
    codes = []
    for m in range(books.shape[1]):
        c = books[:, m]
        distance = c.pow(2).sum(-1)[:, None, :] - 2 * residual @ c.transpose(1, 2)
        code = distance.argmin(-1)
        codes.append(code)
        residual = residual - c.gather(1, code[..., None].expand(-1, -1, group_size))
    return torch.stack(codes, -1).reshape(b, n, k // group_size, len(codes))


def _select_codes(weight, codes, books, scales, h) -> torch.Tensor:
    """One sweep of coordinate descent over (group j, codebook m), all rows at once: each code
    becomes the codeword that lowers tr(dW H dW^T) most given all other codes (possibly itself).

    With u the current codeword, c a candidate, s the row's scale, P = dW H and H_jj the block
    of group j, the error after the swap is, up to terms free of c,
    s^2 c H_jj c^T - 2 s c (P_j + s H_jj u)^T.
    """
    codes = codes.clone()
    b, n, groups, m = codes.shape
    g = books.shape[-1]
    s = scales[..., None]  # [B, N, 1]
    delta = weight - s * _decode(codes, books)
    p = delta @ h
    for j in range(groups):
        cols = slice(j * g, (j + 1) * g)
        h_jj = h[:, cols, cols]
        h_rows = h[:, cols, :]
        for i in range(m):
            book = books[:, i]  # [B, 256, g]
            quad = ((book @ h_jj) * book).sum(-1)  # [B, 256]
            current = book.gather(1, codes[:, :, j, i, None].expand(-1, -1, g))  # [B, N, g]
            target = p[:, :, cols] + s * (current @ h_jj)
            score = s.pow(2) * quad[:, None, :] - 2 * s * (target @ book.transpose(1, 2))
            best = score.argmin(-1)
            change = s * (book.gather(1, best[..., None].expand(-1, -1, g)) - current)  # of W_hat
            p -= change @ h_rows
            codes[:, :, j, i] = best
    return codes


def _scatter_codewords(values: torch.Tensor, codes: torch.Tensor, books: torch.Tensor) -> torch.Tensor:
    """Sum of values [B, N, K] over the (group, codebook) slots that use each codeword -> [B, M, 256, g]."""
    b, n, groups, m = codes.shape
    g = books.shape[-1]
    index = (codes + torch.arange(m, device=codes.device) * (1 << CODE_BITS)
             + torch.arange(b, device=codes.device)[:, None, None, None] * m * (1 << CODE_BITS))
    src = values.reshape(b, n, groups, 1, g).expand(-1, -1, -1, m, -1).reshape(-1, g)
    out = torch.zeros(b * m * (1 << CODE_BITS), g, dtype=values.dtype, device=values.device)
    out.index_add_(0, index.reshape(-1), src)
    return out.reshape(books.shape)


def _refit_codebooks(weight, codes, books, scales, h, iters: int) -> torch.Tensor:
    """The codebooks minimising tr(dW H dW^T) for fixed codes and scales: conjugate gradients on
    the normal equations A C = R, A D = sum over slots of s (decode(D) s H), from the current C."""
    s = scales[..., None]

    def apply(d: torch.Tensor) -> torch.Tensor:
        return _scatter_codewords(s * ((s * _decode(codes, d)) @ h), codes, books)

    def dot(a, b):
        return (a * b).sum((1, 2, 3))

    residual = _scatter_codewords(s * ((weight - s * _decode(codes, books)) @ h), codes, books)
    direction = residual.clone()
    rr = dot(residual, residual)
    books = books.clone()
    for _ in range(iters):
        ad = apply(direction)
        dad = dot(direction, ad)
        alpha = torch.where(dad > 0, rr / dad.clamp_min(1e-300), torch.zeros_like(rr))[:, None, None, None]
        books += alpha * direction
        residual -= alpha * ad
        new_rr = dot(residual, residual)
        beta = torch.where(rr > 0, new_rr / rr.clamp_min(1e-300), torch.zeros_like(rr))[:, None, None, None]
        direction = residual + beta * direction
        rr = new_rr
    return books


def _refit_scales(weight, codes, books, scales, h) -> torch.Tensor:
    """Each row's scale minimising (w - s u) H (w - s u)^T: s = w H u^T / u H u^T (kept where u H u^T = 0)."""
    u = _decode(codes, books)
    uh = u @ h
    num, den = (weight * uh).sum(-1), (u * uh).sum(-1)
    return torch.where(den > 0, num / den.clamp_min(1e-300), scales)
