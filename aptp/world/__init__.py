"""The embedded default world: procedural captioned images, a small pretrained base model, an evaluator.

- `aptp.world.data`: `World(WorldConfig()).sample(n, seed) -> list[Sample(image, caption, scene,
  difficulty)]`, `Scene` / `WorldObject` ground truth, `WorldDataset` (torch map-style dataset).
- `aptp.world.model`: the base UNet config (`build_unet`), scheduler (`build_scheduler`), the frozen
  MiniLM `TextEncoder`, `load_base(dir)` and `sample_images(unet, prompts, ...)` (DDIM, optional CFG).
- `aptp.world.train_base`: `python -m aptp.world.train_base --out DIR` (resumable CPU training).
- `aptp.world.evaluator`: `load_evaluator()`, `score_images(ev, images, scenes)`,
  `attribute_accuracy(results)`, `ev.embed(images)`, `frechet_distance(a, b)`, `mmd(a, b)`.
- `aptp.world.train_evaluator`, `aptp.world.evaluate_base`: train the evaluator; report on a base model.

Shipped assets: `aptp/assets/world/base` (diffusers layout) and `aptp/assets/world/evaluator`.
"""
