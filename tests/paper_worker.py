"""One rank of a 2-process fine-tune from Show-o (``tests/test_paper_run.py``): ``train_paper`` on
the run folder ``argv[1]`` with FSDP2; rank 0 writes the loss curve to ``argv[2]``."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from unif2ace.pipeline.paper import train_paper
from unif2ace.pipeline.recipe import read_recipe

if __name__ == "__main__":
    run, result = Path(sys.argv[1]), Path(sys.argv[2])
    recipe = read_recipe(run / "recipe.yaml", ["train.parallel=fsdp2"])
    res = train_paper(run, recipe, progress=False)
    if int(os.environ["RANK"]) == 0:
        result.write_text(json.dumps({"losses": res["losses"], "loaded": res.get("loaded")}))
