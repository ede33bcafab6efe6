"""The tiny DV-SFT example runs end to end (a few steps; the full run is documented in its docstring)."""

import importlib.util
import pathlib

import pytest

pytest.importorskip("matplotlib")


def test_train_tiny_dvsft_smoke(tmp_path):
    path = pathlib.Path(__file__).resolve().parents[2] / "examples" / "train_tiny_dvsft.py"
    spec = importlib.util.spec_from_file_location("train_tiny_dvsft", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    summary = mod.main(
        [
            "--steps",
            "4",
            "--train-pages",
            "32",
            "--eval-pages",
            "16",
            "--threads",
            "1",
            "--out",
            str(tmp_path),
        ]
    )
    assert (tmp_path / "dvsft_tiny_curves.png").stat().st_size > 0
    assert (tmp_path / "summary.json").exists()
    after = summary["held_out_after"]
    assert all(v == v for v in after.values())  # finite figures
    assert summary["first_train_window"]["vision_loss"] > 0
