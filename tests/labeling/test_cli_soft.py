"""`dvsft-kernels label --soft K [--spread S]`: the JSON's per-token targets and the "soft" arrays,
against coverages worked out by hand on the 5 x 10 grid of 28 px cells of tests/labeling/test_cli.py."""

import json

import pytest

from .test_cli import ID, IGN, run, tok_dir, write_sample  # noqa: F401  (tok_dir: fixture)

# cat: x 28..70 -> cell (1,1) fully, (1,2) half; dog: x 70..112 -> cell (1,2) half, (1,3) fully
WORDS = [{"text": "cat", "box": [28, 28, 70, 56]}, {"text": "dog", "box": [70, 28, 112, 56]}]


def _label(tmp_path, tok_dir, capsys, *extra):  # noqa: F811
    img, ocr = write_sample(tmp_path, words=WORDS)
    out = tmp_path / "labels.json"
    code, _, err = run(["label", img, ocr, "--family", "qwen2_vl", "--tokenizer", tok_dir, "--out", out,
                        "--overlay", tmp_path / "ov.png", *extra], capsys)
    assert code == 0, err
    return json.loads(out.read_text())


def _targets(rec, i):
    """{text: weight} of token i; the JSON rounds weights to 6 decimals, so they compare to 1e-6."""
    return {t["text"]: pytest.approx(t["weight"], abs=1e-6) for t in rec["tokens"][str(i)]["targets"]}


def test_soft_targets_are_the_cells_coverage_shares(tmp_path, tok_dir, capsys):  # noqa: F811
    rec = _label(tmp_path, tok_dir, capsys, "--soft", 2)
    assert set(rec["tokens"]) == {"11", "12", "13"}
    assert _targets(rec, 11) == {"cat": 1.0}
    assert _targets(rec, 12) == {"cat": 0.5, "dog": 0.5}
    assert _targets(rec, 13) == {"dog": 1.0}
    # "labels" keeps the top id (tie: the earlier word), "soft" every slot
    assert rec["labels"][11:14] == [ID["cat"], ID["cat"], ID["dog"]]
    assert rec["soft"]["ids"][12] == [ID["cat"], ID["dog"]] and rec["soft"]["weights"][13] == [1.0, 0.0]
    assert rec["soft"]["ids"][0] == [IGN, IGN] and rec["soft"]["k"] == 2


def test_spread_reaches_labeled_neighbours_only(tmp_path, tok_dir, capsys):  # noqa: F811
    rec = _label(tmp_path, tok_dir, capsys, "--soft", 2, "--spread", 0.2)
    # cell 11: cat 1 + dog's spread 0.2 -> 1/1.2, 0.2/1.2; cell 12: both words' own halves; cell 13 mirrors 11
    assert _targets(rec, 11) == {"cat": 1 / 1.2, "dog": 0.2 / 1.2}
    assert _targets(rec, 12) == {"cat": 0.5, "dog": 0.5}
    assert _targets(rec, 13) == {"dog": 1 / 1.2, "cat": 0.2 / 1.2}
    assert set(rec["tokens"]) == {"11", "12", "13"}  # unlabeled neighbours stay unlabeled


@pytest.mark.parametrize("extra, msg", [(["--soft", "0"], "--soft"), (["--soft", "2", "--spread", "1"], "--spread"),
                                        (["--spread", "0.2"], "--spread needs --soft")])
def test_bad_soft_flags(tmp_path, tok_dir, capsys, extra, msg):  # noqa: F811
    img, ocr = write_sample(tmp_path, words=WORDS)
    code, _, err = run(["label", img, ocr, "--family", "qwen2_vl", "--tokenizer", tok_dir, *extra], capsys)
    assert code == 2 and msg in err
