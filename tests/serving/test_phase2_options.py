"""Phase-2 options from the config: LoRA adapters and shared storage reach the experts a run saves."""

import json

import pytest
import torch

from aptp.cli import main
from aptp.pipeline import RoutedPipeline

TINY = ["backbone.resolution=16", "pruner.progress=false"]


@pytest.mark.parametrize("pruner", [["pruner.phase2.adapter=lora", "pruner.phase2.lora_rank=2",
                                     "pruner.phase2.storage=shared"],
                                    ["pruner=static", "router=single", "assignment=magnitude", "pruner.finetune.steps=2",
                                     "pruner.finetune.batch_size=4", "pruner.finetune.adapter=lora",
                                     "pruner.finetune.lora_rank=2", "pruner.finetune.storage=shared"]])
def test_lora_and_shared_storage_from_the_config(pruner, tmp_path):
    pytest.importorskip("peft")
    out = tmp_path / "run"
    assert main(["run", "smoke", *TINY, *pruner, "--output-dir", str(out)]) == 0
    record = json.loads((out / "experts" / "expert-0" / "aptp_expert.json").read_text())
    assert record.get("storage") == "shared", record
    prompts = ["a red circle", 'the letter "E" in red']
    images = []
    for shared in (False, True):
        pipe = RoutedPipeline.from_run(out, shared=shared)
        gens = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
        images.append(pipe(prompts, num_inference_steps=2, generator=gens, output_type="pt").images)
    torch.testing.assert_close(images[0], images[1], rtol=0, atol=1e-6)


def test_bad_phase2_options_name_their_keys(capsys):
    assert main(["run", "smoke", "pruner.phase2.storage=cloud"]) == 2
    assert "phase2.storage='cloud' is unknown" in capsys.readouterr().err
    assert main(["run", "smoke", "pruner=static", "pruner.finetune.adapter=lora", "pruner.finetune.lora_rank=0"]) == 2
    assert "finetune.adapter / finetune.lora_rank: lora rank=0 must be >= 1" in capsys.readouterr().err


def test_the_static_pruner_refuses_a_learned_router_with_what_to_use(tmp_path, capsys):
    assert main(["run", "smoke", "pruner=static", "assignment=magnitude", "--output-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "router=single" in err and "'ot'" in err and err.count("\n") == 1
    from aptp.core.rundir import FINGERPRINT_FILE, has_results

    assert not has_results(tmp_path / "r", besides=(FINGERPRINT_FILE, "config.yaml"))  # no result to block a rerun
