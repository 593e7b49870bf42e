from __future__ import annotations

from pathlib import Path

import pytest

from freetumor_cli.core.config import build_config, to_yaml
from freetumor_cli.core.errors import ConfigError
from freetumor_cli.core.synthesis_config import SynthesizeConfig


def test_layers_override_in_order(tmp_path: Path) -> None:
    file = tmp_path / "c.yaml"
    file.write_text("organ: kidney\nseed: 5\nsize: small\nrules:\n  abdomen_hu_change: [50, 60]\n")
    cfg = build_config(
        SynthesizeConfig,
        file=file,
        overrides=["seed=7", "rules.placement_grid_mm=3"],
        flags={"size": "large", "organ": None},
    )
    assert cfg.organ == "kidney"  # file (flag given as None is "not set")
    assert cfg.seed == 7  # --set beats file
    assert cfg.size == "large"  # flag beats everything
    assert cfg.rules.abdomen_hu_change == (50.0, 60.0)
    assert cfg.rules.placement_grid_mm == 3.0
    assert cfg.rules.tiny.radius_mm == 6.0  # untouched nested default


def test_defaults_round_trip_through_yaml(tmp_path: Path) -> None:
    file = tmp_path / "d.yaml"
    file.write_text(to_yaml(SynthesizeConfig()))
    assert build_config(SynthesizeConfig, file=file) == SynthesizeConfig()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("colour=red", "unknown configuration key 'colour'"),
        ("rules.nope=1", "unknown configuration key 'rules.nope'"),
        ("seed=abc", "seed must be an integer"),
        ("size=huge", "size must be one of"),
        ("rules.abdomen_hu_change=[1,2,3]", "must have 2 items"),
        ("preview=3", "preview must be true or false"),
        ("copies=0", r"copies must lie in 1\.\.1000"),
        ("count=101", r"count must lie in 1\.\.100"),
        ("novalue", "key=value"),
    ],
)
def test_bad_values_name_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_config(SynthesizeConfig, overrides=[override])


def test_bad_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        build_config(SynthesizeConfig, file=tmp_path / "missing.yaml")
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        build_config(SynthesizeConfig, file=bad)
