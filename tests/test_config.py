import pytest

from seglab.config import TrainConfig, load_train_config
from seglab.engine.schedule import lr_factor
from seglab.errors import SeglabError


def test_defaults_then_yaml_then_overrides(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("model: deeplabv3plus\nepochs: 7\nlr: 0.01\ncrop_size: [64, 96]\namp: true\n")
    cfg = load_train_config(str(cfg_file), lr=0.5, data="x")
    assert (cfg.model, cfg.epochs, cfg.lr, cfg.crop_size, cfg.amp, cfg.data) == (
        "deeplabv3plus",
        7,
        0.5,
        [64, 96],
        True,
        "x",
    )
    assert cfg.batch == TrainConfig.batch


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("epoch: 3\n", "did you mean 'epochs'"),
        ("epochs: three\n", "'epochs' must be int"),
        ("epochs: 2.5\n", "'epochs' must be int"),
        ("amp: maybe\n", "'amp' must be bool"),
        ("crop_size: 5\n", "'crop_size' must be a list"),
        ("- just\n- a list\n", "expected a mapping"),
        ("epochs: [\n", "not valid YAML"),
    ],
)
def test_bad_yaml_is_one_clear_error(tmp_path, text, fragment):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(text)
    with pytest.raises(SeglabError, match=fragment.replace("(", r"\(")) as info:
        load_train_config(str(cfg_file))
    assert "c.yaml" in str(info.value)


@pytest.mark.parametrize(
    ("key", "value", "flag"),
    [
        ("epochs", 0, "--epochs"),
        ("val_fraction", 1.5, "--val-fraction"),
        ("in_channels", 2, "--in-channels"),
        ("scale_range", [2.0, 1.0], "--scale-range"),
        ("crop_size", [8, 8], "--crop-size"),
    ],
)
def test_range_checks_name_the_flag(key, value, flag):
    with pytest.raises(SeglabError, match=flag):
        load_train_config(**{key: value})


def test_lr_schedules_by_hand():
    # warm-up: linear from 1% to 100% over 10 steps
    assert lr_factor(0, total=100, warmup=10, kind="poly") == pytest.approx(0.01)
    assert lr_factor(5, total=100, warmup=10, kind="poly") == pytest.approx(0.01 + 0.99 * 0.5)
    # poly: (1 - t)^0.9, t = (55 - 10) / 90 = 0.5
    assert lr_factor(55, total=100, warmup=10, kind="poly", power=0.9) == pytest.approx(0.5**0.9)
    assert lr_factor(100, total=100, warmup=10, kind="poly") == pytest.approx(0.0)
    # cosine: halfway is one half
    assert lr_factor(55, total=100, warmup=10, kind="cosine") == pytest.approx(0.5)
    # step: gamma every 30 steps
    assert lr_factor(29, total=100, warmup=0, kind="step", step_every=30, gamma=0.1) == pytest.approx(1.0)
    assert lr_factor(61, total=100, warmup=0, kind="step", step_every=30, gamma=0.1) == pytest.approx(0.01)
    assert lr_factor(80, total=100, warmup=0, kind="constant") == 1.0
