"""QuantConfig: what quantization does, parsed from a scheme name in one place."""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from flashc.errors import FlashcError, closest_names

METHODS = ("rtn", "gptq", "awq", "quip", "aqlm", "smoothquant", "fp8")
WEIGHT_ONLY = ("rtn", "gptq", "awq", "quip", "aqlm")
ACTIVATIONS = ("smoothquant", "fp8")  # the input is quantized too, per token, on every call
GROUP_SIZES = (32, 64, 128)
AQLM_GROUP_SIZES = (4, 8, 16)  # AQLM: weights a codeword (passes/quantize/aqlm.py)

# Scheme names accepted by QuantConfig.parse (each also takes -g32/-g64/-g128/-per-channel
# and -sym/-asym suffixes), with what they mean.
SCHEMES = {
    "int4-rtn": "4-bit weights, round to nearest, groups of 128, asymmetric",
    "int4-gptq": "4-bit weights, GPTQ (Hessian error compensation, act-order), groups of 128, asymmetric",
    "int4-awq": "4-bit weights, AWQ (activation-aware scales and clipping), groups of 128, asymmetric",
    "quip-4bit": "4-bit weights, QuIP-style incoherence processing (random Hadamard rotations of the weight "
                 "on both sides, undone at run time) then GPTQ without act-order, groups of 128, asymmetric",
    "aqlm-2bit": "2-bit weights, AQLM additive quantization: each group of 8 weights the sum of 2 codewords "
                 "from 2 learned codebooks of 256, a scale per output row",
    "int8-weight": "8-bit weights, round to nearest, per output channel, symmetric",
    "int8-rtn": "same as int8-weight",
    "int8-gptq": "8-bit weights, GPTQ, per output channel, symmetric",
    "int8-awq": "8-bit weights, AWQ, per output channel, symmetric",
    "w8a8-smoothquant": "int8 weights (per output channel) and int8 activations (per token, dynamic), "
                        "outliers migrated into the weights with a calibrated strength (SmoothQuant)",
    "w8a8": "int8 weights (per output channel) and int8 activations (per token, dynamic), no smoothing",
    "fp8": "FP8 e4m3 weights (a scale per output channel) and activations (a scale per token, dynamic)",
    "fp8-tensor": "FP8 e4m3 weights and activations with one scale per tensor (activations: per call)",
}

# Schemes of flashc issue #14 that are not built yet: asking for one is an error, never RTN.
NOT_IMPLEMENTED = {
}


@dataclass(frozen=True)
class QuantConfig:
    """Quantization of linear layers (and MoE experts): weight-only, or weights and activations.

    method: "rtn" (round to nearest), "gptq" (Frantar et al. 2022, arXiv:2210.17323),
    "awq" (Lin et al. 2023, arXiv:2306.00978) or "quip" (GPTQ on the weight rotated by random
    Hadamard transforms, Chee et al. 2023, arXiv:2307.13304: passes/quantize/quip.py).
    group_size: input columns that share a scale (None: one scale per output channel).
    symmetric: zero point fixed at the grid's midpoint (not stored) instead of one per group.
    act_order, damp, block_size: GPTQ's column order by decreasing Hessian diagonal, dampening as a fraction of the mean
    diagonal, and columns per lazy batch update. awq_grid / awq_clip: AWQ's number of
    exponents alpha tried in [0, 1) and its weight-clipping search. lm_head: quantize the
    output projection too (off, as GPTQ and AWQ leave it: it is the most sensitive layer,
    and a head tied to the embedding keeps its float copy for the lookup anyway).
    quantize_experts: quantize a fused MoE's experts (flashc.moe -> flashc.moe_wq).
    "aqlm" (Egiazarian et al. 2024, arXiv:2401.06118; passes/quantize/aqlm.py): each group of
    group_size weights is the sum of one codeword from each of aqlm_codebooks learned codebooks of
    256 (bits = aqlm_codebooks * 8 / group_size), fitted in aqlm_rounds rounds (flashc.linear_aqlm).
    Weights and activations (flashc.linear_w8a8 / flashc.linear_fp8, 8 bits, per output
    channel, symmetric): "smoothquant" (Xiao et al. 2023, arXiv:2211.10438; smooth=False is
    plain W8A8; alpha: the migration strength, None to search it on the calibration data) and
    "fp8" (e4m3; granularity "row": a scale per output channel and per token, "tensor": one
    each); MoE experts become flashc.moe_a8 (each expert smoothed on the rows routed to it).
    sample_rows: calibration rows kept per input (per expert) for SmoothQuant's search.
    calibration_tokens: at most this many calibration tokens are run;
    min_calibration_tokens: fewer than this (or than the widest layer's input size) is an error.
    """

    method: str = "rtn"
    bits: int = 4
    group_size: int | None = 128
    symmetric: bool = False
    act_order: bool = True
    damp: float = 0.01
    block_size: int = 128
    awq_grid: int = 20
    awq_clip: bool = True
    lm_head: bool = False
    quantize_experts: bool = True
    calibration_tokens: int = 16384
    min_calibration_tokens: int = 1024
    smooth: bool = True
    alpha: float | None = None
    granularity: str = "row"
    sample_rows: int = 1024
    aqlm_codebooks: int = 2
    aqlm_rounds: int = 4

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise FlashcError(f"QuantConfig.method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.method in ACTIVATIONS:
            if self.bits != 8 or self.group_size is not None or not self.symmetric:
                raise FlashcError(f"{self.method} quantizes to 8 bits, symmetric, a scale per output channel: "
                                  f"got bits={self.bits}, group_size={self.group_size}, symmetric={self.symmetric}")
            if self.alpha is not None and not 0 <= self.alpha <= 1:
                raise FlashcError(f"QuantConfig.alpha (SmoothQuant's migration strength) must be in [0, 1], "
                                  f"got {self.alpha!r}")
            if self.granularity not in ("row", "tensor"):
                raise FlashcError(f"QuantConfig.granularity must be 'row' or 'tensor', got {self.granularity!r}")
            if self.sample_rows < 16:
                raise FlashcError(f"QuantConfig.sample_rows must be at least 16, got {self.sample_rows}")
        if self.method == "aqlm":
            self._check_aqlm()
        elif self.bits not in (4, 8):
            raise FlashcError(f"QuantConfig.bits must be 4 or 8 (weight-only), got {self.bits!r}")
        elif self.group_size is not None and self.group_size not in GROUP_SIZES:
            raise FlashcError(f"QuantConfig.group_size must be one of {', '.join(map(str, GROUP_SIZES))} or "
                              f"None (per output channel), got {self.group_size!r}")
        if self.method == "quip" and self.bits != 4:
            raise FlashcError(f"QuIP quantizes to 4 bits here (scheme quip-4bit), got bits={self.bits}")
        if not 0 < self.damp < 1:
            raise FlashcError(f"QuantConfig.damp must be in (0, 1), got {self.damp!r}")
        if self.block_size < 1 or self.awq_grid < 1:
            raise FlashcError("QuantConfig.block_size and awq_grid must be positive")
        if self.min_calibration_tokens < 1 or self.calibration_tokens < self.min_calibration_tokens:
            raise FlashcError(f"QuantConfig.calibration_tokens ({self.calibration_tokens}) must be at least "
                              f"min_calibration_tokens ({self.min_calibration_tokens}), which must be positive")

    def _check_aqlm(self) -> None:
        """AQLM: aqlm_codebooks codebooks of 256 codewords (8-bit codes) of group_size weights, so
        bits = aqlm_codebooks * 8 / group_size."""
        if self.group_size not in AQLM_GROUP_SIZES or not 1 <= self.aqlm_codebooks <= 4:
            raise FlashcError(f"AQLM takes group_size (weights a codeword) in {', '.join(map(str, AQLM_GROUP_SIZES))} "
                              f"and 1 to 4 codebooks, got group_size={self.group_size}, "
                              f"aqlm_codebooks={self.aqlm_codebooks}")
        if self.bits * self.group_size != self.aqlm_codebooks * 8:
            raise FlashcError(f"AQLM with {self.aqlm_codebooks} codebooks of 8-bit codes and groups of "
                              f"{self.group_size} stores {self.aqlm_codebooks * 8 / self.group_size:g} bits a weight, "
                              f"not bits={self.bits}")
        if self.aqlm_rounds < 0:
            raise FlashcError(f"QuantConfig.aqlm_rounds must be at least 0, got {self.aqlm_rounds}")

    @property
    def needs_calibration(self) -> bool:
        return self.method in ("gptq", "awq", "quip", "aqlm") or (self.method == "smoothquant" and self.smooth)

    @property
    def activations(self) -> bool:
        """Whether the layer's input is quantized too (W8A8, FP8), not only its weight."""
        return self.method in ACTIVATIONS

    @property
    def scheme(self) -> str:
        """A readable name that parse() reads back: 'int4-gptq-g128', 'int8-rtn-per-channel-sym', 'fp8'."""
        if self.method == "smoothquant":
            return "w8a8-smoothquant" if self.smooth else "w8a8"
        if self.method == "quip":
            return f"quip-4bit-{f'g{self.group_size}' if self.group_size else 'per-channel'}-" \
                   f"{'sym' if self.symmetric else 'asym'}"
        if self.method == "fp8":
            return "fp8" if self.granularity == "row" else "fp8-tensor"
        if self.method == "aqlm":
            return "aqlm-2bit" if (self.aqlm_codebooks, self.group_size) == (2, 8) else \
                f"aqlm-{self.aqlm_codebooks}x8-g{self.group_size}"
        group = f"g{self.group_size}" if self.group_size else "per-channel"
        return f"int{self.bits}-{self.method}-{group}-{'sym' if self.symmetric else 'asym'}"

    @classmethod
    def parse(cls, text: "str | QuantConfig", group_size: int | None = None) -> "QuantConfig":
        """A config from a scheme name: 'int4-awq', 'int4-gptq', 'int4-rtn', 'int8-weight', with
        optional suffixes '-g32' / '-g64' / '-g128' / '-per-channel' and '-sym' / '-asym'.
        group_size (e.g. the CLI's --group-size) overrides the scheme's group size."""
        if isinstance(text, QuantConfig):
            return text if group_size is None else replace(text, group_size=group_size)
        if not isinstance(text, str):
            raise FlashcError(f"quantize must be a scheme name or a QuantConfig, got {type(text).__name__}")
        name = text.strip().lower()
        aqlm = re.fullmatch(r"aqlm-(?:2bit|(\d)x8-g(\d+))", name)
        if name.startswith("aqlm") and not aqlm:
            raise FlashcError(f"quantization scheme {text!r}: AQLM schemes are 'aqlm-2bit' (2 codebooks x 8-bit "
                              "codes, groups of 8) or 'aqlm-<M>x8-g<g>', with no other suffix")
        if aqlm:  # M codebooks x 8-bit codes, groups of g weights: M * 8 / g bits a weight
            if group_size is not None:
                raise FlashcError(f"quantization scheme {text!r}: AQLM's group size is part of its name "
                                  "('aqlm-2x8-g8' = aqlm-2bit); drop the group size override")
            books, group = (int(aqlm.group(1)), int(aqlm.group(2))) if aqlm.group(1) else (2, 8)
            return cls(method="aqlm", bits=max(1, books * 8 // group), group_size=group, symmetric=True,
                       aqlm_codebooks=books)
        symmetric = None
        suffix = re.search(r"-(sym|asym)$", name)
        if suffix:
            symmetric, name = suffix.group(1) == "sym", name[: suffix.start()]
        group: int | None | str = "default"
        suffix = re.search(r"-(g(\d+)|per-channel)$", name)
        if suffix:
            group = int(suffix.group(2)) if suffix.group(2) else None
            name = name[: suffix.start()]
        if name in ("w8a8-smoothquant", "w8a8", "fp8", "fp8-tensor"):
            if group != "default" or group_size is not None or symmetric is False:
                raise FlashcError(f"quantization scheme {text!r}: {name} takes no group size or -asym suffix "
                                  "(weights: a scale per output channel, symmetric; activations: per token)")
            if name.startswith("w8a8"):
                return cls(method="smoothquant", bits=8, group_size=None, symmetric=True,
                           smooth=name == "w8a8-smoothquant")
            return cls(method="fp8", bits=8, group_size=None, symmetric=True,
                       granularity="tensor" if name == "fp8-tensor" else "row")
        if name == "quip-4bit":  # incoherence replaces act-order (passes/quantize/quip.py)
            group = 128 if group == "default" else group
            return cls(method="quip", bits=4, act_order=False, group_size=group if group_size is None else group_size,
                       symmetric=bool(symmetric))
        if name in NOT_IMPLEMENTED:
            raise FlashcError(f"quantization scheme {text!r} ({NOT_IMPLEMENTED[name]}) is not implemented yet "
                              f"(flashc issue #14); implemented: {', '.join(SCHEMES)}")
        if name not in SCHEMES:
            hint = closest_names(name, [*SCHEMES, *NOT_IMPLEMENTED])
            raise FlashcError(f"unknown quantization scheme {text!r}"
                              + (f"; did you mean {', '.join(repr(h) for h in hint)}?" if hint else "")
                              + f" Known schemes: {', '.join(SCHEMES)} (suffixes -g32/-g64/-g128/-per-channel, "
                                f"-sym/-asym)"
                              + (f"; not implemented yet: {', '.join(NOT_IMPLEMENTED)}" if NOT_IMPLEMENTED else ""))
        bits = int(name[3])
        method = name.split("-")[1]
        method = "rtn" if method == "weight" else method
        defaults = dict(group_size=128, symmetric=False) if bits == 4 else dict(group_size=None, symmetric=True)
        if group != "default":
            defaults["group_size"] = group
        if group_size is not None:
            defaults["group_size"] = group_size
        if symmetric is not None:
            defaults["symmetric"] = symmetric
        return cls(method=method, bits=bits, **defaults)
