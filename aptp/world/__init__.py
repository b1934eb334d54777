"""The embedded default world: procedural captioned images, its base model, an evaluator.

- `aptp.world.data`: `World(WorldConfig()).sample(n, seed) -> list[Sample(image, caption, scene,
  difficulty)]`, `Scene` / `WorldObject` ground truth, `WorldDataset` (torch map-style dataset).
- `aptp.world.base`: the shipped base model is the framework's `unet` backbone with the `world`
  preset (`configs/backbone/world.yaml`); `backbone()` builds it, and its `load`, `encode_prompts`
  and `generate` are the only loader, text encoder and sampler of the world model.
- `aptp.world.evaluator`: `load_evaluator()`, `score_images(ev, images, scenes)`,
  `attribute_accuracy(results)`, `ev.embed(images)` (the features of the `world_fd` / `world_mmd`
  metrics, whose distances live in `aptp.metrics`).
- `aptp.world.tools`: the scripts that build the shipped assets (`train_base`, `train_evaluator`,
  `evaluate_base`, `evaluator_robustness`), run as `python -m aptp.world.tools.<name>`.

Shipped assets: `aptp/assets/world/base` (diffusers layout) and `aptp/assets/world/evaluator`.
"""
