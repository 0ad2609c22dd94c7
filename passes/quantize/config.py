"""QuantConfig: what quantization does, parsed from a scheme name in one place."""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from flashc.errors import FlashcError, closest_names

METHODS = ("rtn", "gptq", "awq", "quip", "aqlm", "smoothquant", "fp8")
WEIGHT_ONLY = ("rtn", "gptq", "awq", "quip", "aqlm")
ACTIVATIONS = ("smoothquant", "fp8")  # the input is quantized too, per token, on every call
GROUP_SIZES = (32, 64, 128)
PACKED_BITS = (2, 3, 4, 8)  # widths flashc.quantized_ops packs, all a budget may choose from
# The widths a budget chooses from by default: with 3 among them a 3.5 budget puts layers at 3 and 4
# bits instead of a quarter of the weights at 2; (3, 4, 8) alone cannot reach budgets below about
# 3.15 (every layer at 3 bits with fp16 scales and zero points, groups of 128), so 2 stays a candidate.
# mixtral-ref, both texts: mixed-3.5 +2.45% with these, +2.74% with (3, 4, 8), +3.13% with (2, 4, 8);
# mixed-3 +6.00% against +9.43% (passes/quantize/mixed.py's docstring).
CANDIDATE_BITS = (2, 3, 4, 8)
UNIFORM_BITS = {"rtn": (3, 4, 8), "gptq": (3, 4, 8)}  # weight-only widths by method; the others: 4 or 8
MIXED_METHODS = ("rtn", "gptq")  # the methods a budget quantizes each layer with (passes/quantize/mixed.py)
SCALE_BITS = 16  # a scale stored in fp16/bf16, the dtype of the weights a budget is usually set for
AQLM_GROUP_SIZES = (4, 8, 16)  # AQLM: weights a codeword (passes/quantize/aqlm.py)

# Scheme names accepted by QuantConfig.parse (each also takes -g32/-g64/-g128/-per-channel
# and -sym/-asym suffixes), with what they mean.
SCHEMES = {
    "int4-rtn": "4-bit weights, round to nearest, groups of 128, asymmetric",
    "int4-gptq": "4-bit weights, GPTQ (Hessian error compensation, act-order), groups of 128, asymmetric",
    "int4-awq": "4-bit weights, AWQ (activation-aware scales and clipping), groups of 128, asymmetric",
    "int3-rtn": "3-bit weights, round to nearest, groups of 128, asymmetric (eight codes in three bytes)",
    "int3-gptq": "3-bit weights, GPTQ (Hessian error compensation, act-order), groups of 128, asymmetric",
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
    "mixed-3.5": "2-, 3-, 4- or 8-bit weights chosen per layer by measured sensitivity so that the quantized layers "
                 "average at most 3.5 stored bits a weight (scales and zero points counted), GPTQ, groups of 128, "
                 "asymmetric; any budget: 'mixed-<bits>' ('mixed-3', 'mixed-4.5-rtn'), other widths: '-b<widths>' "
                 "('mixed-3.5-b248'; passes/quantize/mixed.py)",
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
    budget_bits: mixed precision (passes/quantize/mixed.py): each quantized layer (each MoE layer's
    experts together) gets one of candidate_bits, chosen from its measured sensitivity so that the
    stored bits a weight (codes, scales and zero points) averaged over the quantized layers' weights
    stay within this budget; `bits` is then unused. method "rtn" or "gptq" quantizes each layer at
    its width; sensitivity_tokens: held-out calibration tokens the sensitivities are measured on.
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
    budget_bits: float | None = None
    candidate_bits: tuple[int, ...] = CANDIDATE_BITS
    sensitivity_tokens: int = 2048

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
        if self.budget_bits is not None:
            self._check_budget()
        if self.method == "aqlm":
            self._check_aqlm()
        elif self.bits not in UNIFORM_BITS.get(self.method, (4, 8)):
            widths = UNIFORM_BITS.get(self.method, (4, 8))
            raise FlashcError(f"QuantConfig.bits must be {', '.join(map(str, widths[:-1]))} or {widths[-1]} "
                              f"(weight-only, method {self.method!r}), got {self.bits!r}"
                              + (" (3 bits: method 'rtn' or 'gptq')" if self.bits == 3 else ""))
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

    def _check_budget(self) -> None:
        """A budget chooses among at least two of PACKED_BITS, with rtn or gptq, and lies between
        the cost of every layer at the narrowest candidate and at the widest (scales of SCALE_BITS)."""
        if isinstance(self.budget_bits, bool) or not isinstance(self.budget_bits, (int, float)):
            raise FlashcError(f"QuantConfig.budget_bits must be a number of bits a weight, got {self.budget_bits!r}")
        if self.method not in MIXED_METHODS:
            budget = f"mixed-{self.budget_bits:g}"
            raise FlashcError(f"a bit budget quantizes each layer with {' or '.join(MIXED_METHODS)}, got method "
                              f"{self.method!r}: use '{budget}-gptq' or '{budget}-rtn'")
        widths = self.candidate_bits
        if (not isinstance(widths, tuple) or len(widths) < 2 or len(set(widths)) != len(widths)
                or any(b not in PACKED_BITS for b in widths) or list(widths) != sorted(widths)):
            raise FlashcError(f"QuantConfig.candidate_bits must be two or more of {PACKED_BITS} in increasing "
                              f"order (a tuple), got {widths!r}")
        lo, hi = self.stored_bits(widths[0]), self.stored_bits(widths[-1])
        if not lo <= self.budget_bits <= hi:
            raise FlashcError(f"QuantConfig.budget_bits={self.budget_bits:g} is outside what candidate_bits {widths} "
                              f"store with {self._group_label()}: {lo:.3f} (every layer at {widths[0]} bits) to "
                              f"{hi:.3f} (every layer at {widths[-1]} bits), counting {SCALE_BITS}-bit scales"
                              + ("" if self.symmetric else " and zero points"))
        if self.sensitivity_tokens < 16:
            raise FlashcError(f"QuantConfig.sensitivity_tokens must be at least 16, got {self.sensitivity_tokens}")

    def stored_bits(self, bits: int, scale_bits: int = SCALE_BITS, k: int | None = None) -> float:
        """Bits stored a weight at this width: the code plus its group's scale (and zero point when
        asymmetric) shared by group_size weights (per output channel: by k, 0 when k is unknown)."""
        group = self.group_size or k
        return bits + ((scale_bits + (0 if self.symmetric else bits)) / group if group else 0.0)

    def _group_label(self) -> str:
        return f"groups of {self.group_size}" if self.group_size else "a scale per output channel"

    def with_budget(self, budget_bits: float | None) -> "QuantConfig":
        """This config with a bit budget (the CLI's --budget-bits next to --quantize): its method,
        group size and symmetry kept, the width of each layer chosen under the budget."""
        if budget_bits is None:
            return self
        if self.method not in MIXED_METHODS:
            raise FlashcError(f"a bit budget applies to a weight-only rtn or gptq scheme (e.g. int4-gptq or "
                              f"mixed-{budget_bits:g}), not {self.scheme}")
        return replace(self, budget_bits=float(budget_bits))

    @property
    def mixed(self) -> bool:
        """Whether each layer's width is chosen under budget_bits (passes/quantize/mixed.py)."""
        return self.budget_bits is not None

    @property
    def needs_calibration(self) -> bool:
        if self.mixed:  # sensitivities are measured on calibration data, whatever the method
            return True
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
        if self.mixed:
            cands = "" if self.candidate_bits == CANDIDATE_BITS else f"-b{''.join(map(str, self.candidate_bits))}"
            return f"mixed-{self.budget_bits:g}{cands}-{self.method}-{group}-{'sym' if self.symmetric else 'asym'}"
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
        if name.startswith("mixed"):
            return cls._parse_mixed(text, name, group, group_size, symmetric)
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
        defaults = dict(group_size=128, symmetric=False) if bits < 8 else dict(group_size=None, symmetric=True)
        if group != "default":
            defaults["group_size"] = group
        if group_size is not None:
            defaults["group_size"] = group_size
        if symmetric is not None:
            defaults["symmetric"] = symmetric
        return cls(method=method, bits=bits, **defaults)

    @classmethod
    def _parse_mixed(cls, text: str, name: str, group, group_size: int | None, symmetric: bool | None
                     ) -> "QuantConfig":
        """'mixed-<budget>[-b<candidates>][-gptq|-rtn]' (suffixes already taken off): GPTQ, groups of
        128, asymmetric unless the suffixes say otherwise; '-b348' names the candidate widths."""
        m = re.fullmatch(r"mixed-(\d+(?:\.\d+)?)(?:-b([2348]+))?(?:-(gptq|rtn))?", name)
        if not m:
            raise FlashcError(f"quantization scheme {text!r}: a mixed-precision scheme is 'mixed-<bits a weight>' "
                              "with optional '-b<widths>' (e.g. -b24, -b348), '-gptq' or '-rtn', '-g<size>' / "
                              "'-per-channel' and '-sym' / '-asym' (e.g. 'mixed-3.5', 'mixed-3.5-rtn-g64')")
        fields = dict(method=m.group(3) or "gptq", budget_bits=float(m.group(1)), group_size=128, symmetric=False)
        if m.group(2):
            fields["candidate_bits"] = tuple(int(c) for c in m.group(2))
        if group != "default":
            fields["group_size"] = group
        if group_size is not None:
            fields["group_size"] = group_size
        if symmetric is not None:
            fields["symmetric"] = symmetric
        return cls(**fields)
