"""``unif2ace generate --showo …`` / ``unif2ace answer --showo …`` and :class:`ShowoPipeline`
end to end, on a miniature Show-o (4 × 4 codes: 64 px), the released-size MAGVIT-v2 with random
weights and a small tokenizer, all written to disk in the released layouts."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from showo_mini import phi_reference, write_showo, write_tokenizer  # noqa: E402
from test_magvitv2 import random_state, write_checkpoint  # noqa: E402

from unif2ace.cli import main  # noqa: E402
from unif2ace.showo import ShowoPipeline  # noqa: E402
from unif2ace.vq.magvitv2 import MagvitV2Config  # noqa: E402


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("released")
    write_showo(root / "showo", phi_reference(), num_vq_tokens=16)
    write_checkpoint(root / "magvit", random_state(MagvitV2Config()))
    write_tokenizer(root / "tok")
    return root


def test_pipeline_generate_and_answer(folders):
    pipe = ShowoPipeline.from_folders(folders / "showo", folders / "tok", folders / "magvit")
    assert pipe.size == 64
    a = pipe.generate("a smiling woman", steps=2, guidance=2.0, seed=1)
    assert a.shape == (1, 64, 64, 3) and a.dtype == torch.uint8
    answer = pipe.answer(__import__("PIL.Image").Image.fromarray(a[0].numpy()), "what?")
    assert isinstance(answer, str)
    with pytest.raises(ValueError, match="no prompts"):
        pipe.generate([])


def test_cli_generate_then_answer(folders, tmp_path, capsys):
    base = ["--showo", str(folders / "showo"), "--tokenizer", str(folders / "tok")]
    base += ["--magvit", str(folders / "magvit")]
    out = tmp_path / "gen"
    rc = main(["generate", *base, "--prompt", "a smiling woman", "--steps", "2", "--per-prompt",
               "1", "--out", str(out)])  # fmt: skip
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    (png,) = res["images"]
    from PIL import Image

    img = np.asarray(Image.open(png))
    assert img.shape == (64, 64, 3) and res["size"] == 64
    rc = main(["answer", *base, "--image", png, "--question", "What is shown?"])
    assert rc == 0
    (ans,) = json.loads(capsys.readouterr().out)["answers"]
    assert ans["question"] == "What is shown?" and isinstance(ans["answer"], str)


def test_cli_errors(folders, tmp_path, capsys):
    base = ["--showo", str(folders / "showo"), "--tokenizer", str(folders / "tok")]
    cases = [
        (["generate", *base, "--prompt", "x", "--out", str(tmp_path)], "--magvit"),
        (["generate", *base, "--magvit", str(folders / "magvit"), "--prompt", "x", "--size",
          "256", "--out", str(tmp_path)], "generates 64 px"),
        (["generate", "--showo", str(tmp_path), "--tokenizer", str(folders / "tok"), "--magvit",
          str(folders / "magvit"), "--prompt", "x", "--out", str(tmp_path)], "config.json"),
    ]  # fmt: skip
    for argv, match in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert match in err and "Traceback" not in err
