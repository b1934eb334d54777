import torch

from aptp.core.checkpoint import latest_checkpoint, list_checkpoints, rng_state, save_checkpoint, set_rng_state


def test_roundtrip_nested_state_with_optimizer(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    state = {"model": model.state_dict(), "opt": opt.state_dict(), "rng": rng_state(), "note": ("a", 1)}
    save_checkpoint(tmp_path, 7, state)
    step, loaded = latest_checkpoint(tmp_path)
    assert step == 7 and loaded["note"] == ("a", 1)
    model2 = torch.nn.Linear(3, 2)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-3)
    model2.load_state_dict(loaded["model"])
    opt2.load_state_dict(loaded["opt"])
    assert torch.equal(model2.weight, model.weight)
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    set_rng_state(loaded["rng"])
    a = torch.rand(3)
    set_rng_state(loaded["rng"])
    assert torch.equal(a, torch.rand(3))


def test_keeps_newest_and_ignores_partial(tmp_path):
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, {"x": torch.tensor([step])}, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000002", "step-00000003"]
    partial = tmp_path / "step-00000009"  # a kill before meta.json was written
    partial.mkdir()
    (partial / "state.safetensors").write_bytes(b"")
    step, state = latest_checkpoint(tmp_path)
    assert step == 3 and int(state["x"]) == 3
    assert latest_checkpoint(tmp_path / "none") is None
