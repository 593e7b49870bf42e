"""Every default the command line shows is its stage config's (no typed-in copy that can drift)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import fields
from typing import Any

import pytest
import typer

from freetumor_cli.app import app
from freetumor_cli.core.hub import DEFAULT_TIMEOUT_S, TIMEOUT_VARIABLE
from freetumor_cli.core.stage_configs import EvaluateConfig, PrepareConfig, TrainSegConfig, TrainSynthConfig
from freetumor_cli.core.synthesis_config import SynthesizeConfig

CONFIGS: dict[str, Any] = {
    "prepare": PrepareConfig(),
    "synthesize": SynthesizeConfig(),
    "train-seg": TrainSegConfig(),
    "train-synth": TrainSynthConfig(),
    "evaluate": EvaluateConfig(),
}
# Options whose name is not their config key.
CONFIG_KEYS = {("train-seg", "organ"): "task"}


def demo_config() -> Any:
    from freetumor_cli.core.demo import DemoConfig

    return DemoConfig()


def commands(group: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    for name, command in group.commands.items():
        if hasattr(command, "commands"):  # a group (nnunet)
            yield from commands(command, f"{prefix}{name} ")
        else:
            yield prefix + name, command


def shown_defaults() -> list[tuple[str, Any]]:
    """(command name, option) for every option whose shown default is a text."""
    return [
        (name, param)
        for name, command in commands(typer.main.get_command(app))
        for param in command.params
        if param.param_type_name == "option" and isinstance(param.show_default, str)
    ]


def test_the_commands_show_defaults() -> None:
    shown = {name for name, _ in shown_defaults()}
    assert {"prepare", "synthesize", "train-seg", "train-synth", "evaluate", "fetch-labels"} <= shown


@pytest.mark.parametrize(("command", "option"), shown_defaults(), ids=lambda x: x if isinstance(x, str) else x.name)
def test_shown_default_is_the_config_default(command: str, option: Any) -> None:
    assert option.name is not None and isinstance(option.show_default, str)
    if option.name == "timeout":  # fetch-*: the environment, else the hub module's constant
        assert option.show_default == f"${TIMEOUT_VARIABLE}, else {DEFAULT_TIMEOUT_S:g}"
        return
    config = demo_config() if command == "demo" else CONFIGS[command]
    key = CONFIG_KEYS.get((command, option.name), option.name)
    assert key in {f.name for f in fields(config)}, f"{command} --{option.name}: no config key {key!r}"
    default = getattr(config, key)
    # Read the shown text as a value of the default's type, so 2 and 2.0 are the same default.
    assert type(default)(option.show_default) == default, f"{command} {option.opts}: {option.show_default!r}"


def test_train_seg_mode_and_its_alias_task() -> None:
    command = typer.main.get_command(app).commands["train-seg"]  # type: ignore[attr-defined]
    mode = next(p for p in command.params if p.name == "mode")
    assert mode.opts == ["--mode", "--task"]
    assert "--task is an alias of --mode" in mode.help
    for flag in ("--mode", "--task"):
        ctx = command.make_context("train-seg", [flag, "freesyn"], resilient_parsing=True)
        assert ctx.params["mode"] == "freesyn"
