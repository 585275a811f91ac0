"""The command line, run as a user would: adapt a folder, then classify with the artifact."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from lafter import cli
from lafter.artifact import AdaptedModel
from tests import launcher

TINY = str(Path(__file__).resolve().parents[1] / "assets" / "tiny-vit.json") + "::random"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    """``python -m lafter *args`` in a process of its own (see ``tests/launcher.py``)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LAFTER_LLM_BASE_URL": "", "OPENAI_API_KEY": ""}
    return launcher.run("lafter", list(args), env=env, timeout=300)


def test_adapt_then_classify(tmp_path, capsys):
    """The one smoke test of ``python -m lafter`` as a separate process (adapt); the classify step
    and the rest run ``cli.main`` in this process."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "imgs" / "nested"
    folder.mkdir(parents=True)
    for i in range(10):
        Image.fromarray(rng.integers(0, 255, (36, 44, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    out = tmp_path / "model.safetensors"
    res = _run(
        "adapt",
        "--model",
        TINY,
        "--classes",
        "cat, dog,horse",
        "--images",
        str(tmp_path / "imgs"),
        "--out",
        str(out),
        "--max-steps",
        "2",
        "--text-steps",
        "20",
        "--device",
        "cpu",
    )
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    assert summary["classes"] == ["cat", "dog", "horse"] and summary["images"] == 10
    assert summary["descriptions"]["source"] == "templates"
    assert summary["hyperparameters"]["adapt"]["total_steps"] == 2
    assert summary["hyperparameters"]["text_classifier"]["steps"] == 20
    assert "adapting" in res.stderr  # the progress bar
    assert out.is_file()

    code = cli.main(
        ["classify", "--artifact", str(out), "--json", "--top-k", "2", str(folder / "0.png"), str(folder)]
    )
    stdout, stderr = capsys.readouterr()
    assert code == 0, stderr
    rows = json.loads(stdout)
    assert len(rows) == 11
    assert all(len(r["predictions"]) == 2 for r in rows)
    assert {p["label"] for r in rows for p in r["predictions"]} <= {"cat", "dog", "horse"}


def test_errors_are_reported_with_their_code(tmp_path, capsys):
    argv = ["adapt", "--model", "ViT-B-32::nope", "--classes", "a,b", "--images", str(tmp_path), "--out", "x"]
    assert cli.main(argv) == 2
    assert "[invalid_model_spec]" in capsys.readouterr().err
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"garbage")
    assert cli.main(["classify", "--artifact", str(bad), str(tmp_path)]) == 2
    assert "[artifact_corrupt]" in capsys.readouterr().err


# --- in process: what the summary says, as the service says it ----------------------------------

CLASSES = ["red thing", "blue thing"]


def _png(path: Path, seed: int, color: tuple[int, int, int]) -> Path:
    rng = np.random.default_rng(seed)
    noise = rng.integers(-40, 40, size=(36, 36, 3))
    pixels = np.clip(np.array(color)[None, None, :] + noise, 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("LAFTER_LLM_BASE_URL", "LAFTER_LLM_API_KEY", "OPENAI_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    folder = tmp_path / "photos"
    for i in range(10):
        _png(folder / f"{i}.png", i, (210, 40, 40) if i % 2 else (40, 40, 210))
    return folder


def adapt(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, Any], str]:
    """``python -m lafter adapt`` in this process: (exit code, JSON summary or {}, stderr)."""
    code = cli.main(
        [
            "adapt", "--model", TINY, "--classes", ",".join(CLASSES), "--device", "cpu", "--quiet",
            "--text-steps", "5", "--max-steps", "2", "--batch-size", "4", *args,
        ]
    )  # fmt: skip
    out, err = capsys.readouterr()
    return code, (json.loads(out) if code == 0 else {}), err


def test_recipe_reaches_stage_2_and_is_reported(
    offline: None, photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "m.safetensors"
    code, paper, err = adapt(capsys, "--images", str(photos), "--out", str(out), "--recipe", "paper")
    assert code == 0, err
    assert paper["recipe"] == "paper"
    used = paper["hyperparameters"]["adapt"]
    assert used["prompt_tokens"] == 50 and used["pseudo_label_balance"] == "none"
    assert used["strong_crop_scale"] == [0.2, 1.0]
    code, default, err = adapt(capsys, "--images", str(photos), "--out", str(out))
    assert code == 0, err
    assert default["recipe"] == "default"
    used = default["hyperparameters"]["adapt"]
    assert used["prompt_tokens"] == 4 and used["pseudo_label_balance"] == "align"  # 16 patches, width 64
    code, explicit, err = adapt(
        capsys, "--images", str(photos), "--out", str(out), "--recipe", "paper", "--prompt-tokens", "8"
    )
    assert code == 0, err
    assert explicit["hyperparameters"]["adapt"]["prompt_tokens"] == 8  # a value wins over the recipe


def test_without_labels_the_summary_says_what_was_saved_and_why(
    offline: None, photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "m.safetensors"
    code, summary, err = adapt(capsys, "--images", str(photos), "--out", str(out))
    assert code == 0, err
    served = summary["served"]
    assert served["kind"] in ("lafter", "text_classifier", "zero_shot") and served["reason"]
    assert summary["evaluation"]["selection"]["served"] == served["kind"]
    assert "guard" in summary["evaluation"] and "labelled" not in summary["evaluation"]
    assert AdaptedModel.load(out).kind == served["kind"]  # --out holds what the evaluation chose
    assert summary["descriptions"] == {"requested": "auto", "source": "templates", "sentences": 16}
    assert {w["code"] for w in summary["warnings"]} >= {"descriptions"}  # templates only, and it says so
    assert all(set(w) >= {"code", "message"} for w in summary["warnings"])


def test_eval_dir_is_evaluated_on_and_never_trained_on(
    offline: None, photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    labelled = photos / "labelled"  # inside --images: still not trained on
    for i in range(3):
        _png(labelled / "red thing" / f"r{i}.png", 100 + i, (210, 40, 40))
        _png(labelled / "Blue_Thing" / f"b{i}.png", 200 + i, (40, 40, 210))  # names match as the service's
    (photos / "copy_of_0.png").write_bytes((photos / "0.png").read_bytes())  # a duplicate, taken once
    out = tmp_path / "m.safetensors"
    code, summary, err = adapt(
        capsys, "--images", str(photos), "--out", str(out), "--eval-dir", str(labelled)
    )
    assert code == 0, err
    assert summary["images"] == 10 and summary["eval_images"] == 6
    assert summary["images_skipped"] == {"duplicates": 1, "in_eval_split": 6}
    evaluation = summary["evaluation"]
    accuracy = evaluation["labelled"]["accuracy"]
    assert evaluation["labelled"]["images"] == 6
    assert set(accuracy) == {"zero_shot", "text_classifier", "lafter"}
    assert summary["served"]["kind"] == evaluation["selection"]["served"]
    assert accuracy[summary["served"]["kind"]] == max(accuracy.values())
    # a confusion matrix per classifier, rows (true class) in summary["classes"] order: 3 images each
    confusion = evaluation["labelled"]["confusion"]
    assert set(confusion) == set(accuracy) and len(summary["classes"]) == 2
    for kind, matrix in confusion.items():
        assert [sum(row) for row in matrix] == [3, 3]
        assert (matrix[0][0] + matrix[1][1]) / 6 == pytest.approx(accuracy[kind], abs=1e-4)
    assert AdaptedModel.load(out).kind == summary["served"]["kind"]


def test_same_images_under_other_names_give_the_same_model(
    offline: None, photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Images are taken in content order, as the service takes them: names and folders do not matter."""
    renamed = tmp_path / "renamed"
    for i, p in enumerate(sorted(photos.iterdir(), reverse=True)):
        (renamed / f"sub{i % 3}").mkdir(parents=True, exist_ok=True)
        (renamed / f"sub{i % 3}" / f"z{i}.png").write_bytes(p.read_bytes())
    models = []
    for folder in (photos, renamed):
        out = tmp_path / f"{folder.name}.safetensors"
        code, summary, err = adapt(capsys, "--images", str(folder), "--out", str(out), "--epochs", "2")
        assert code == 0, err
        models.append((summary, AdaptedModel.load(out)))
    (first, a), (second, b) = models
    assert first["evaluation"] == second["evaluation"]
    assert a.tensors.keys() == b.tensors.keys()
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)


def test_descriptions_file_is_used(
    offline: None, photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sentences = tmp_path / "sentences.json"
    sentences.write_text(
        json.dumps({"red thing": ["a red square", "something red"], "Blue Thing": ["a blue square"]})
    )
    out = tmp_path / "m.safetensors"
    code, summary, err = adapt(
        capsys, "--images", str(photos), "--out", str(out), "--descriptions-file", str(sentences)
    )
    assert code == 0, err
    assert summary["descriptions"]["requested"] == summary["descriptions"]["source"] == "provided"
    assert summary["descriptions"]["file"] == str(sentences)
    assert summary["descriptions"]["sentences"] > 3  # the user's sentences plus the templates


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "cannot read it"),
        ("{not json", "not valid JSON"),
        ('["a red square"]', "expected a JSON object"),
        ('{"red thing": "a red square", "blue thing": ["x"]}', "must be a list of strings"),
        ('{"red thing": ["x"], "blue thing": ["y"], "green thing": ["z"]}', "not in --classes"),
        ('{"red thing": ["x"], "blue thing": ["  "]}', "no sentences for ['blue thing']"),
    ],
)
def test_a_bad_descriptions_file_is_a_clear_error(
    offline: None,
    photos: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    content: str | None,
    message: str,
) -> None:
    path = tmp_path / "sentences.json"
    if content is not None:
        path.write_text(content)
    out = tmp_path / "m.safetensors"
    code, _, err = adapt(capsys, "--images", str(photos), "--out", str(out), "--descriptions-file", str(path))
    assert code == 2 and "[invalid_input]" in err and str(path) in err and message in err, err
    assert not out.exists()


def test_eval_dir_errors(
    offline: None, photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "m.safetensors"
    labelled = tmp_path / "labelled"
    _png(labelled / "red thing" / "r.png", 300, (210, 40, 40))
    _png(labelled / "green thing" / "g.png", 301, (40, 210, 40))
    code, _, err = adapt(capsys, "--images", str(photos), "--out", str(out), "--eval-dir", str(labelled))
    assert code == 2 and "['green thing'] are not among --classes" in err, err
    loose = tmp_path / "loose"
    _png(loose / "x.png", 302, (40, 210, 40))
    code, _, err = adapt(capsys, "--images", str(photos), "--out", str(out), "--eval-dir", str(loose))
    assert code == 2 and "one folder per class" in err, err
    code, _, err = adapt(
        capsys, "--images", str(photos), "--out", str(out), "--eval-dir", str(tmp_path / "no")
    )
    assert code == 2 and "not a folder" in err, err
    assert not out.exists()
