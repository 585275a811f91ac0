"""The command line, run as a user would: adapt a folder, then classify with the artifact."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

TINY = str(Path(__file__).resolve().parents[1] / "assets" / "tiny-vit.json") + "::random"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LAFTER_LLM_BASE_URL": "", "OPENAI_API_KEY": ""}
    return subprocess.run(
        [sys.executable, "-m", "lafter", *args], capture_output=True, text=True, env=env, timeout=300
    )


def test_adapt_then_classify(tmp_path):
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

    res = _run(
        "classify", "--artifact", str(out), "--json", "--top-k", "2", str(folder / "0.png"), str(folder)
    )
    assert res.returncode == 0, res.stderr
    rows = json.loads(res.stdout)
    assert len(rows) == 11
    assert all(len(r["predictions"]) == 2 for r in rows)
    assert {p["label"] for r in rows for p in r["predictions"]} <= {"cat", "dog", "horse"}


def test_errors_are_reported_with_their_code(tmp_path):
    res = _run(
        "adapt", "--model", "ViT-B-32::nope", "--classes", "a,b", "--images", str(tmp_path), "--out", "x"
    )
    assert res.returncode == 2 and "[invalid_model_spec]" in res.stderr
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"garbage")
    res = _run("classify", "--artifact", str(bad), str(tmp_path))
    assert res.returncode == 2 and "[artifact_corrupt]" in res.stderr
