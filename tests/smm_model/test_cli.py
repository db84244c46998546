"""The `smm` dispatcher and the shipped configs."""

import subprocess
import sys
from pathlib import Path

import pytest

from smm_model.cli import COMMANDS, main
from smm_model.config import ExperimentConfig

ROOT = Path(__file__).resolve().parents[2]


def test_help_lists_commands_without_importing_them(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out
    # `smm --help` must not import torch (it has to be instant).
    code = "import sys; from smm_model.cli import main; main(['--help']); print('torch' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert res.stdout.strip().splitlines()[-1] == "False"


def test_unknown_command_fails(capsys):
    assert main(["frobnicate"]) == 2
    assert "unknown command" in capsys.readouterr().err


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    ExperimentConfig.from_yaml_text(path.read_text(), source=str(path))


def test_config_command_reports_bad_field(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model:\n  hidden_dim: -4\n")
    assert main(["config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "model.hidden_dim" in err and str(cfg) in err
    assert main(["config", str(tmp_path / "missing.yaml")]) == 2
    assert main(["config", str(ROOT / "configs" / "reference.yaml"), "--set", "train.epochs=2"]) == 0
    assert "epochs: 2" in capsys.readouterr().out
