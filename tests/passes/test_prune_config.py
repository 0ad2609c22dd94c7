"""PruneConfig: specs parsed in one place, read back from `spec`, and clear errors naming the option."""

import pytest

from flashc.errors import FlashcError
from flashc.passes.prune import PruneConfig


@pytest.mark.parametrize("text, method, sparsity, n_m", [
    ("wanda-50%", "wanda", 0.5, None),
    ("magnitude-50", "magnitude", 0.5, None),
    ("SparseGPT-60%", "sparsegpt", 0.6, None),
    ("2:4", "sparsegpt", 0.5, (2, 4)),
    ("wanda-2:4", "wanda", 0.5, (2, 4)),
    ("magnitude-4:8", "magnitude", 0.5, (4, 8)),
    ("sparsegpt-1:4", "sparsegpt", 0.75, (1, 4)),
    ("online-40%", "online", 0.4, None),
    ("dejavu-40%", "dejavu", 0.4, None),
    ("DejaVu-25", "dejavu", 0.25, None),
    ("ffn-25%", "ffn", 0.25, None),
    ("online-0%", "online", 0.0, None),
    ("wanda-95%", "wanda", 0.95, None),
    ("heads-25%", "heads", 0.25, None),
    ("Heads-50", "heads", 0.5, None),
    ("heads-0%", "heads", 0.0, None),
    ("experts-25%", "experts", 0.25, None),
])
def test_parse_and_spec_round_trip(text, method, sparsity, n_m):
    config = PruneConfig.parse(text)
    assert (config.method, config.n_m) == (method, n_m)
    assert config.sparsity == pytest.approx(sparsity)
    assert PruneConfig.parse(config.spec) == config
    assert PruneConfig.parse(config) is config
    assert config.needs_calibration == (method != "magnitude")
    assert config.pattern == ("2:4" if n_m == (2, 4) else config.pattern)


@pytest.mark.parametrize("text, message", [
    ("wanda-96%", r"prune='wanda-96%': the sparsity must be within 0-95%, got 96%"),
    ("online-100", r"within 0-95%"),
    ("sparsegpt-1:32", r"sparsity must be within 0-95%.*the 1:32 pattern"),
    ("4:4", r"keeps N of every M weights, so 0 < N < M"),
    ("wanda-0:4", r"0 < N < M"),
    ("online-2:4", r"N:M patterns apply to magnitude, wanda, sparsegpt"),
    ("wandaa-50%", r"unknown pruning method 'wandaa'; did you mean 'wanda'"),
    ("dejavu-96%", r"prune='dejavu-96%': the sparsity must be within 0-95%, got 96%"),
    ("dejavu-2:4", r"N:M patterns apply to magnitude, wanda, sparsegpt"),
    ("deja-40%", r"unknown pruning method 'deja'; did you mean 'dejavu'"),
    ("heads-100%", r"prune='heads-100%': the sparsity must be within 0-95%, got 100%"),
    ("experts-2.5", r"N is an integer \('experts-2'\); for a share of each layer's experts write 'experts-25%'"),
    ("experts-2:4", r"N:M patterns apply to magnitude, wanda, sparsegpt"),
    ("head-25%", r"unknown pruning method 'head'; did you mean 'heads'"),
    ("half", r"not a pruning spec; known specs: magnitude-X%"),
])
def test_bad_specs_say_what_and_what_to_do(text, message):
    with pytest.raises(FlashcError, match=message):
        PruneConfig.parse(text)


def test_config_fields_are_checked():
    with pytest.raises(FlashcError, match=r"PruneConfig.sparsity must be within 0-95%, got -0.1"):
        PruneConfig(sparsity=-0.1)
    with pytest.raises(FlashcError, match="PruneConfig.method must be one of"):
        PruneConfig(method="random")
    with pytest.raises(FlashcError, match="N:M patterns apply to"):
        PruneConfig(method="ffn", n_m=(2, 4))
    with pytest.raises(FlashcError, match="calibration_tokens"):
        PruneConfig(calibration_tokens=10)
    with pytest.raises(FlashcError, match="prune must be a spec"):
        PruneConfig.parse(0.5)
    assert PruneConfig(method="wanda", n_m=(2, 4), sparsity=0.9).sparsity == 0.5  # the pattern decides


@pytest.mark.parametrize("text, count", [("experts-2", 2), ("experts-0", 0), ("EXPERTS-7", 7)])
def test_experts_count_round_trip(text, count):
    config = PruneConfig.parse(text)
    assert (config.method, config.count, config.sparsity) == ("experts", count, 0.0)
    assert config.spec == text.lower() and PruneConfig.parse(config.spec) == config
    assert config.needs_calibration and config.pattern == "experts"


def test_count_and_recovery_are_checked():
    from flashc.distill import DistillConfig

    with pytest.raises(FlashcError, match=r"PruneConfig.count \(experts removed per MoE layer\) applies to 'experts'"):
        PruneConfig(method="wanda", count=2)
    with pytest.raises(FlashcError, match=r"must be an integer >= 0, got -1"):
        PruneConfig(method="experts", count=-1)
    with pytest.raises(FlashcError, match="recovery distillation is not built for head pruning"):
        PruneConfig(method="heads", sparsity=0.25, recover=DistillConfig(steps=1))
    with pytest.raises(FlashcError, match=r"recovery distillation is built for magnitude, wanda, sparsegpt, ffn, "
                                          r"experts"):
        PruneConfig(method="online", sparsity=0.4, recover=DistillConfig(steps=1))
    assert PruneConfig(method="ffn", sparsity=0.25, recover=DistillConfig(steps=1)).recover.steps == 1
    assert PruneConfig(method="experts", count=1, recover=DistillConfig(steps=1)).recover.steps == 1
