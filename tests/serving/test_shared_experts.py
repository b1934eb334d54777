"""Experts that share storage: index sets over ONE dense model plus their diffs, loaded materialised
(a plain diffusers model) or as a SharedExpert over the resident dense weights."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import random_arch

from aptp.core.errors import DamagedFileError, IncompatibleError
from aptp.pruners.expert import (
    DELTA_FILE,
    EXPERT_FILE,
    LowRank,
    SharedExpert,
    load_expert,
    resident_bytes,
    save_expert,
    slice_map,
)
from aptp.pruners.gating import cut_model


def _run(unet, x, t, text):
    with torch.no_grad():
        return unet(x, t, encoder_hidden_states=text, return_dict=False)[0]


def _finetuned(tiny, seed: int):
    """An expert cut at a random architecture (lowest-resolution depth pair dropped), all its weights changed."""
    bb, dense, space, grans, _ = tiny
    arch = random_arch(space.size, seed, 0.4)
    arch[space.mask_of_kind("depth").nonzero()[:2, 0]] = 0
    expert = cut_model(dense, space, grans, arch)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # full fine-tuning changes every weight
        for p in expert.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=g))
    return expert, arch


@pytest.fixture(scope="module")
def shared_folder(tiny, tmp_path_factory):
    bb, dense, space, grans, ref = tiny
    expert, arch = _finetuned(tiny, 5)
    folder = save_expert(tmp_path_factory.mktemp("shared") / "e0", expert, arch, space, grans, bb.conditioning(),
                         backbone=ref, storage="shared", dense=dense)
    return folder, expert


def test_every_cut_tensor_is_found_as_a_slice_of_the_dense_weights(tiny):
    bb, dense, space, grans, _ = tiny
    arch = random_arch(space.size, 3, 0.5)
    expert = cut_model(dense, space, grans, arch)
    slices = slice_map(dense, space, grans, arch)
    state = {**dict(dense.named_parameters()), **dict(dense.named_buffers())}
    own = {**dict(expert.named_parameters()), **dict(expert.named_buffers())}
    assert set(slices) == set(own)
    for name, sl in slices.items():
        assert sl is not None, name
        assert torch.equal(sl.take(state[sl.source]), own[name]), name


def test_shared_and_materialised_experts_compute_the_fine_tuned_expert(tiny, shared_folder, tiny_inputs):
    _, dense, _, _, _ = tiny
    folder, expert = shared_folder
    meta = json.loads((folder / EXPERT_FILE).read_text())
    assert meta["storage"] == "shared" and not (folder / "diffusion_pytorch_model.safetensors").exists()
    materialised = load_expert(folder, dense=dense)
    shared = load_expert(folder, dense=dense, materialise=False)
    assert type(materialised).__name__ == "UNet2DConditionModel"  # a plain model for stock pipelines
    assert isinstance(shared, SharedExpert) and shared.dense is dense
    ref = _run(expert, *tiny_inputs)
    assert torch.allclose(_run(materialised, *tiny_inputs), ref, atol=1e-5)
    assert torch.allclose(_run(shared, *tiny_inputs), _run(materialised, *tiny_inputs), atol=1e-5, rtol=0)
    # the materialised expert owns its tensors: the dense weights are never aliased
    dense_ptrs = {p.untyped_storage().data_ptr() for p in dense.parameters()}
    assert not dense_ptrs & {p.untyped_storage().data_ptr() for p in materialised.parameters()}


def test_a_shared_expert_reloads_from_the_backbone_without_a_dense_model_given(shared_folder, tiny_inputs):
    folder, expert = shared_folder
    reloaded = load_expert(folder, materialise=False)  # the tiny backbone's dense model, rebuilt from its seed
    assert torch.allclose(_run(reloaded, *tiny_inputs), _run(expert, *tiny_inputs), atol=1e-5)


def test_k_shared_experts_hold_one_dense_copy_plus_their_diffs(tiny, tmp_path):
    bb, dense, space, grans, ref = tiny
    experts, materialised = [], []
    for k in range(3):
        arch = random_arch(space.size, 10 + k, 0.4)
        lowrank = {}
        expert = cut_model(dense, space, grans, arch)
        for name, p in expert.named_parameters():  # a LoRA-style phase 2: rank-2 diffs of the 2-D / 4-D weights
            if p.dim() >= 2 and name.endswith("weight"):
                g = torch.Generator().manual_seed(k)
                lowrank[name] = LowRank(0.01 * torch.randn(2, p[0].numel(), generator=g),
                                        torch.randn(p.shape[0], 2, generator=g), 0.5)
        folder = save_expert(tmp_path / f"e{k}", expert, arch, space, grans, bb.conditioning(), backbone=ref,
                             storage="shared", dense=dense, lowrank=lowrank)
        experts.append(load_expert(folder, dense=dense, materialise=False))
        materialised.append(load_expert(folder, dense=dense))
    own = sum(e.own_bytes() for e in experts)
    dense_bytes = resident_bytes(dense)
    assert resident_bytes(*experts) == dense_bytes + own  # the dense weights counted once
    assert own < 0.5 * sum(resident_bytes(m) for m in materialised)
    x, t, text = (a[:2] for a in (torch.randn(2, *bb.conditioning().sample_shape), torch.tensor([10, 700]),
                                  torch.randn(2, bb.conditioning().text_len, bb.conditioning().text_dim)))
    for e, m in zip(experts, materialised):
        assert torch.allclose(_run(e, x, t, text), _run(m, x, t, text), atol=1e-5, rtol=0)


def test_a_damaged_delta_file_is_one_line_damaged_file_error(shared_folder, tmp_path):
    import shutil

    folder, _ = shared_folder
    copy = tmp_path / "damaged"
    shutil.copytree(folder, copy)
    data = (copy / DELTA_FILE).read_bytes()
    (copy / DELTA_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(DamagedFileError) as err:
        load_expert(copy, materialise=False)
    assert "\n" not in str(err.value) and "expert" in str(err.value)


def test_other_dense_weights_are_refused(shared_folder, tiny):
    import copy

    folder, _ = shared_folder
    other = copy.deepcopy(tiny[1])
    with torch.no_grad():
        next(other.parameters()).add_(1.0)
    with pytest.raises(IncompatibleError, match="other dense weights"):
        load_expert(folder, dense=other, materialise=False)


def test_a_shared_expert_works_under_torch_compile(shared_folder, tiny_inputs):
    folder, expert = shared_folder
    shared = load_expert(folder, materialise=False)
    compiled = torch.compile(shared, backend="eager")  # dynamo capture of the gathers and the UNet
    x, t, text = (a[:1] for a in tiny_inputs)
    assert torch.allclose(_run(compiled, x, t, text), _run(expert, x, t, text), atol=1e-5)


def test_gathered_weights_are_held_for_a_block_of_calls_and_then_dropped(shared_folder, tiny_inputs):
    folder, expert = shared_folder
    shared = load_expert(folder, materialise=False)
    ref = _run(expert, *tiny_inputs)
    with shared.gathered():
        held = shared._held
        assert held is not None
        assert torch.allclose(_run(shared, *tiny_inputs), ref, atol=1e-5)
        with shared.gathered():  # nested: the outer block's weights
            assert shared._held is held
    assert shared._held is None


def test_compressed_diffs_are_marked_lossy_smaller_and_shared_equals_materialised(tiny, tmp_path, tiny_inputs):
    bb, dense, space, grans, ref = tiny
    expert, arch = _finetuned(tiny, 7)
    exact = save_expert(tmp_path / "exact", expert, arch, space, grans, bb.conditioning(), backbone=ref,
                        storage="shared", dense=dense)
    lossy = save_expert(tmp_path / "lossy", expert, arch, space, grans, bb.conditioning(), backbone=ref,
                        storage="shared", dense=dense, diff_rank=2)
    meta = json.loads((lossy / EXPERT_FILE).read_text())["shared"]
    assert meta["lossy"] is True and meta["diff_rank"] == 2 and meta["lossy_tensors"] > 0
    assert json.loads((exact / EXPERT_FILE).read_text())["shared"]["lossy"] is False
    assert (lossy / DELTA_FILE).stat().st_size < 0.5 * (exact / DELTA_FILE).stat().st_size
    shared, materialised = load_expert(lossy, dense=dense, materialise=False), load_expert(lossy, dense=dense)
    assert torch.allclose(_run(shared, *tiny_inputs), _run(materialised, *tiny_inputs), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="diff_rank=0 must be >= 1"):
        save_expert(tmp_path / "bad", expert, arch, space, grans, bb.conditioning(), storage="shared", dense=dense,
                    diff_rank=0)
