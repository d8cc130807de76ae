"""``skmm curate --precision`` and ``ModelConfig.precision`` (issue 12): the default config dumps as before (so its
cache keys and lineage record are unchanged), another precision is named in it, a bad one is one clear line."""

from __future__ import annotations

import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from flows.cli import app
from flows.curate import ModelConfig


def test_the_default_model_config_dumps_as_before_and_others_name_their_precision():
    assert ModelConfig().model_dump() == {"name": "ViT-S-32", "pretrained": None, "init_seed": 0}
    bf16 = ModelConfig(name="skmm-tiny-vit", precision="bf16")
    assert bf16.model_dump() == {"name": "skmm-tiny-vit", "pretrained": None, "init_seed": 0, "precision": "bf16"}
    assert ModelConfig(**bf16.model_dump()) == bf16 and ModelConfig(**ModelConfig().model_dump()) == ModelConfig()
    assert ModelConfig(precision="tf32").model_dump()["precision"] == "tf32"
    with pytest.raises(ValidationError, match="precision"):
        ModelConfig(precision="fp16")


def test_a_bad_precision_is_one_line_before_any_flow(tmp_path):
    result = CliRunner().invoke(app, ["curate", "digits", "--precision", "fp16", "--store", str(tmp_path / "s")])
    assert result.exit_code == 2, (result.output, result.exception)
    assert result.stderr.startswith("error: ") and "'fp32', 'tf32' or 'bf16'" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "s").exists()
